"""The page `neco app` serves: one HTML document with its CSS and JS, no frontend build.

A Python string rather than a data file so that it ships in every install of the package.
The page talks only to the JSON API of `neco.app.server`; the element ids are the interface
the browser test drives (`#bank`, `#support`, `#query`, `#run`, `#error`, `#mask`, `#download`),
and `body[data-state]` is `idle`, `busy`, `done` or `error`.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NeCo in-context segmentation</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  .hint { color: #555; font-size: 0.9rem; margin-top: 0; }
  form { display: grid; grid-template-columns: 12rem 1fr; gap: 0.6rem 1rem; align-items: center; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; padding: 0.8rem 1rem; margin: 1rem 0; }
  #error { color: #a40000; font-weight: 600; white-space: pre-wrap; }
  #status { color: #555; }
  #result { display: none; }
  body[data-state="done"] #result { display: block; }
  .pictures { display: flex; flex-wrap: wrap; gap: 1rem; }
  figure { margin: 0; }
  figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
  figcaption { font-size: 0.9rem; color: #444; }
  #legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; font-size: 1rem; }
  .swatch { display: inline-block; width: 1rem; height: 1rem; border: 1px solid #000; vertical-align: -0.15rem;
            margin-right: 0.35rem; }
</style>
</head>
<body data-state="idle">
<h1>NeCo in-context segmentation</h1>
<p class="hint">Segment a query image by k-NN label transfer from a memory bank: a saved one, or one built from
support images with masks you upload here.</p>
<form id="segment-form">
  <label for="bank">Saved bank</label>
  <select id="bank" name="bank"><option value="">(none: use the support upload below)</option></select>
  <label for="support">or support images + masks</label>
  <span><input id="support" name="support" type="file" multiple accept=".zip,image/*">
    <span class="hint">a zip of a support folder (images/, masks/, classes.json) or files NAME.png with NAME_mask.png
    </span></span>
  <label for="classes">class names (optional)</label>
  <input id="classes" name="classes" type="text" placeholder="background, cat, dog (default: classes.json)">
  <label for="query">Query image</label>
  <input id="query" name="query" type="file" accept="image/*" required>
  <label for="k">neighbours k</label>
  <input id="k" name="k" type="number" min="1" max="1024" step="1">
  <label for="temperature">temperature</label>
  <input id="temperature" name="temperature" type="number" min="0.0001" step="any">
  <span></span>
  <span><button id="run" type="submit">Segment</button> <span id="status"></span></span>
</form>
<p id="error" role="alert"></p>
<section id="result">
  <h2 id="summary"></h2>
  <ul id="legend"></ul>
  <div class="pictures">
    <figure><img id="overlay" alt="mask overlay"><figcaption>prediction over the query, with legend</figcaption></figure>
    <figure><img id="confidence" alt="confidence map"><figcaption>confidence of the chosen class (0-1)</figcaption>
    </figure>
    <figure><img id="pca" alt="PCA of the features"><figcaption>dense features: first 3 principal components</figcaption>
    </figure>
    <figure><img id="mask" alt="mask PNG"><figcaption>mask PNG (pixel value = class index)
      <a id="download" download="mask.png">download</a></figcaption></figure>
  </div>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let limits = { max_upload_bytes: Infinity };

function setState(state, message) {
  document.body.dataset.state = state;
  $("error").textContent = state === "error" ? message : "";
  $("status").textContent = state === "busy" ? "segmenting..." : "";
  $("run").disabled = state === "busy";
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}

async function load() {
  try {
    limits = await getJSON("api/config");
    $("k").value = limits.k;
    $("temperature").value = limits.temperature;
    const listing = await getJSON("api/banks");
    for (const name of listing.banks) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("bank").appendChild(option);
    }
    if (listing.banks.length) $("bank").value = listing.banks[0];
    document.body.dataset.banks = "loaded";
  } catch (failure) {
    setState("error", "cannot reach the app: " + failure.message);
  }
}

function showResult(result) {
  const zoom = Math.max(1, Math.floor(320 / result.size[1]));  // one pixel scale for all pictures (nearest)
  for (const id of ["overlay", "confidence", "pca", "mask"]) {
    $(id).onload = () => { $(id).style.width = $(id).naturalWidth * zoom + "px"; };
    $(id).src = result[id];
  }
  $("download").href = result.mask;
  $("summary").textContent = result.bank + ": " + result.size[0] + "x" + result.size[1] + " px, " +
    result.grid[0] + "x" + result.grid[1] + " patches, mean confidence " + result.mean_confidence.toFixed(2);
  $("legend").replaceChildren(...result.legend.map((entry) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.colour;
    item.append(swatch, entry.name + " " + (100 * entry.share).toFixed(1) + "%");
    return item;
  }));
  setState("done");
}

async function submit(event) {
  event.preventDefault();
  const form = new FormData($("segment-form"));
  let bytes = 0;
  for (const value of form.values()) if (value instanceof File) bytes += value.size;
  if (bytes > limits.max_upload_bytes) {
    const mib = (n) => (n / 1048576).toFixed(1) + " MiB";
    setState("error", "upload too large: " + mib(bytes) + "; the limit is " + mib(limits.max_upload_bytes));
    return;
  }
  setState("busy");
  try {
    const response = await fetch("api/segment", { method: "POST", body: form });
    const text = await response.text();
    let answer;
    try { answer = JSON.parse(text); } catch { answer = { error: "HTTP " + response.status + " " + response.statusText }; }
    if (response.ok) showResult(answer); else setState("error", answer.error || "HTTP " + response.status);
  } catch (failure) {
    setState("error", "request failed: " + failure.message);
  }
}

$("segment-form").addEventListener("submit", submit);
$("support").addEventListener("change", () => { if ($("support").files.length) $("bank").value = ""; });
load();
</script>
</body>
</html>
"""
