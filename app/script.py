"""The page's script (`GET /page.js`, after `paint.js`): examples, queries, the request and the gallery."""

SCRIPT = r"""// ---- queries, the request, the gallery ---------------------------------------------------------------------
function setQueries(files) {
  queries = files;
  $("query-thumbs").replaceChildren(...files.map((file) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file); img.alt = img.title = file.name;
    return img;
  }));
}

async function buildForm() {
  const form = new FormData();
  for (const file of queries) form.append("query", file, file.name);
  const bank = $("bank").value;
  if (bank) {
    form.append("bank", bank);
  } else {
    let painted = 0;
    for (const [index, entry] of supports.entries()) {
      if (!entry.labels.some((v) => v !== IGNORE)) continue;
      const extension = (entry.name.match(/\.(png|jpe?g|bmp|tiff?|webp)$/i) || [".png"])[0].toLowerCase();
      form.append("support", entry.file, "painted" + index + extension);
      form.append("support", await maskPNG(entry.labels, entry.width, entry.height), "painted" + index + "_mask.png");
      painted += 1;
    }
    for (const file of ready) form.append("support", file, file.name);
    if (!painted && !ready.length) throw new Error("paint a few strokes on a support image (or pick a saved bank)");
    form.append("classes", classes.map((c) => c.name).join(", "));
    form.append("colours", classes.map((c) => c.colour).join(","));
  }
  const mode = $("size-mode").value;
  form.append("size", mode === "custom" ? $("size").value : mode);
  form.append("k", $("k").value);
  form.append("temperature", $("temperature").value);
  form.append("upsample", $("upsample").value);
  return form;
}

function zoomed(img, side) {
  img.onload = () => {
    const zoom = Math.max(1, Math.floor(RESULT_SIDE / side));
    img.style.width = img.naturalWidth * zoom + "px";
  };
}

function figure(src, caption, side) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  zoomed(img, side);
  img.src = src; img.alt = caption;
  const text = document.createElement("figcaption");
  text.textContent = caption;
  fig.append(img, text);
  return fig;
}

function swatch(entry, withShare) {
  const item = document.createElement("li");
  const box = document.createElement("span");
  box.className = "swatch"; box.style.background = entry.colour;
  item.append(box, entry.name + (withShare ? " " + (100 * entry.share).toFixed(1) + "%" : ""));
  return item;
}

function showResults(answer) {
  const bank = answer.bank, results = answer.results;
  const seen = new Map();
  for (const result of results) for (const entry of result.legend) seen.set(entry.name, entry);
  $("legend").replaceChildren(...[...seen.values()].map((entry) => swatch(entry, false)));
  $("summary").textContent = "Bank: " + bank.label + ", " + bank.patches + " labelled patches, resize policy " +
    bank.policy + (bank.support_side ? " (support images at " + bank.support_side + " px)" : "") +
    " \u00b7 k = " + answer.k + " \u00b7 temperature " + answer.temperature + " \u00b7 " + answer.upsample +
    " upsampling \u00b7 " + results.length + " quer" +
    (results.length === 1 ? "y" : "ies");
  $("bank-download").href = bank.download;
  $("gallery").replaceChildren(...results.map((result) => {
    const card = document.createElement("article");
    card.className = "card";
    const title = document.createElement("h3");
    title.textContent = result.name;
    const side = result.size[1];
    const figs = document.createElement("div");
    figs.className = "figs";
    figs.append(figure(result.query, "query", side), figure(result.overlay, "prediction", side),
                figure(result.confidence, "confidence", side), figure(result.pca, "features (PCA)", side));
    const facts = document.createElement("p");
    facts.className = "facts";
    facts.textContent = result.size[0] + "x" + result.size[1] + " px, encoder ran at " + result.input_size[0] + "x" +
      result.input_size[1] + " px (" + result.grid[0] + "x" + result.grid[1] + " patches), k = " + answer.k +
      ", mean confidence " + result.mean_confidence.toFixed(2);
    const shares = document.createElement("ul");
    shares.className = "legend shares";
    shares.append(...result.legend.map((entry) => swatch(entry, true)));
    const link = document.createElement("a");
    link.className = "mask-download"; link.href = result.mask; link.textContent = "mask PNG (pixel = class index)";
    link.download = stem(result.name) + "_mask.png";
    card.append(title, figs, facts, shares);
    for (const note of result.notes) {
      const line = document.createElement("p");
      line.className = "note"; line.textContent = note;
      card.append(line);
    }
    card.append(link);
    return card;
  }));
  setState("done");
}

async function run() {
  let form;
  try {
    if (!queries.length) throw new Error("choose query images to segment (or click an example)");
    form = await buildForm();
  } catch (failure) {
    setState("error", failure.message);
    return;
  }
  let bytes = 0;
  for (const value of form.values()) if (value instanceof Blob) bytes += value.size;
  if (bytes > settings.max_upload_bytes) {
    const mib = (n) => (n / 1048576).toFixed(1) + " MiB";
    setState("error", "upload too large: " + mib(bytes) + "; the limit is " + mib(settings.max_upload_bytes));
    return;
  }
  setState("busy");
  try {
    const response = await fetch("api/segment", { method: "POST", body: form });
    const text = await response.text();
    let answer;
    try { answer = JSON.parse(text); } catch { answer = { error: "HTTP " + response.status + " " + response.statusText }; }
    if (response.ok) showResults(answer); else setState("error", answer.error || "HTTP " + response.status);
  } catch (failure) {
    setState("error", "request failed: " + failure.message);
  }
}

// ---- examples and start ------------------------------------------------------------------------------------
async function fileFrom(url, name) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return new File([await response.blob()], name, { type: "image/png" });
}

async function openExample(example) {
  setState("busy");
  try {
    const bytes = Uint8Array.from(atob(example.labels), (c) => c.charCodeAt(0));
    setClasses(example.classes);
    supports = []; ready = []; $("ready").textContent = "";
    await addSupport(await fileFrom(example.support.url, example.id + "-support.png"), bytes);
    setQueries(await Promise.all(example.queries.map((url, i) => fileFrom(url, example.id + "-query" + i + ".png"))));
  } catch (failure) {
    setState("error", "cannot open the example: " + failure.message);
    return;
  }
  $("bank").value = ""; $("size-mode").value = ""; $("size").hidden = true;
  fitBrush();
  showSupport(0);
  await run();
}

async function load() {
  try {
    settings = await getJSON("api/config");
    $("k").value = settings.k;
    $("temperature").value = settings.temperature;
    setClasses(["background", "object"]);
    const listing = await getJSON("api/banks");
    for (const name of listing.banks) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("bank").appendChild(option);
    }
    document.body.dataset.banks = "loaded";
    const examples = (await getJSON("api/examples")).examples;
    $("examples").replaceChildren(...examples.map((example) => {
      const button = document.createElement("button");
      button.type = "button"; button.dataset.example = example.id;
      const img = document.createElement("img");
      img.src = example.support.url; img.alt = "";
      button.append(img, example.title);
      button.onclick = () => openExample(example);
      return button;
    }));
    document.body.dataset.examples = "loaded";
  } catch (failure) {
    setState("error", "cannot reach the app: " + failure.message);
  }
}

$("query").addEventListener("change", () => setQueries([...$("query").files]));
$("size-mode").addEventListener("change", () => { $("size").hidden = $("size-mode").value !== "custom"; });
$("run").addEventListener("click", run);
load();
"""
