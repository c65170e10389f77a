"""The painter's script (`GET /paint.js`, loaded before `page.js`): classes, support images, strokes, masks.

Painting keeps one label per pixel of each support image (Uint8Array, 255 = not painted) at the
image's own size. A stroke paints every pixel whose centre lies within the brush radius of the
segment between two pointer positions, each snapped to its pixel's centre, so the test can
rebuild the same mask in Python. Painted masks travel as 8-bit grey PNGs (`NAME_mask.png`, encoded
here with the browser's CompressionStream) beside their images, the layout the server already
reads for uploaded support sets. The globals declared here (`$`, `classes`, `supports`, ...) are
shared with `page.js`, a classic script of the same page.
"""

PAINTER = r""""use strict";
const $ = (id) => document.getElementById(id);
const HISTORY = 30;            // undo steps kept per support image
const STAGE = 448;             // small images are enlarged by a whole factor up to about this many CSS px
const RESULT_SIDE = 224;       // same for the result pictures
const IGNORE = 255;
const MASK_NAME = /[_.-]mask$/i;
let settings = { max_upload_bytes: Infinity, palette: ["#000000", "#e6194b"] };
let classes = [];              // {name, colour}
let current = 0;               // class index being painted
let tool = "brush";
let supports = [];             // {file, name, bitmap, width, height, labels, history}
let ready = [];                // support files passed on as they are (zip, masks, classes.json, their images)
let shown = -1;                // index in supports of the painted image
let queries = [];              // File

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

// ---- classes ------------------------------------------------------------------------------------------------
function renderClasses() {
  $("classes").replaceChildren(...classes.map((entry, index) => {
    const row = document.createElement("label");
    row.className = "class-row";
    const pick = document.createElement("input");
    pick.type = "radio"; pick.name = "class"; pick.checked = index === current;
    pick.onchange = () => { current = index; tool = "brush"; renderTools(); };
    const colour = document.createElement("input");
    colour.type = "color"; colour.value = entry.colour;
    colour.oninput = () => { entry.colour = colour.value; drawLabels(); };
    const name = document.createElement("input");
    name.type = "text"; name.value = entry.name; name.className = "class-name";
    name.oninput = () => { entry.name = name.value.trim(); };
    const key = document.createElement("kbd");
    key.textContent = index < 9 ? String(index + 1) : "";
    row.append(pick, colour, name, key);
    return row;
  }));
}

function setClasses(names) {
  classes = names.map((name, i) => ({ name, colour: settings.palette[i % settings.palette.length] }));
  current = Math.min(1, classes.length - 1);
  renderClasses();
}

function selectClass(index) {
  if (index < classes.length) { current = index; tool = "brush"; renderClasses(); renderTools(); }
}

function renderTools() {
  $("tool-brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("tool-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  $("brush-size").textContent = $("brush").value;
}

// ---- support images and the painter -------------------------------------------------------------------------
async function addSupport(file, labels) {
  const bitmap = await createImageBitmap(file);
  const size = bitmap.width * bitmap.height;
  const entry = { file, name: file.name, bitmap, width: bitmap.width, height: bitmap.height,
                  labels: labels || new Uint8Array(size).fill(IGNORE), history: [] };
  supports.push(entry);
  return entry;
}

function fitBrush() {
  // a brush of about 1/28 of the first image's shorter side: 4 px on a 112-px scene, 37 px on a 1024-px photo
  if (supports.length) $("brush").value = Math.max(2, Math.round(Math.min(supports[0].width, supports[0].height) / 28));
  renderTools();
}

function stem(name) { return name.replace(/\.[^.]*$/, ""); }

async function chooseSupports(files) {
  const masks = new Set(files.filter((f) => MASK_NAME.test(stem(f.name))).map((f) => stem(f.name).slice(0, -5)));
  supports = []; ready = [];
  for (const file of files) {
    const passOn = /\.(zip|json)$/i.test(file.name) || MASK_NAME.test(stem(file.name)) || masks.has(stem(file.name));
    if (passOn) ready.push(file); else await addSupport(file);
  }
  $("ready").textContent = ready.length ? ready.length + " support file(s) with their own masks are sent as they are" : "";
  if (supports.length || ready.length) $("bank").value = "";
  fitBrush();
  showSupport(supports.length ? 0 : -1);
}

function renderThumbs() {
  $("support-thumbs").replaceChildren(...supports.map((entry, index) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(entry.file);
    img.alt = entry.name; img.title = entry.name + " (click to paint)";
    img.classList.toggle("current", index === shown);
    img.classList.toggle("painted", entry.labels.some((v) => v !== IGNORE));
    img.onclick = () => showSupport(index);
    return img;
  }));
}

function showSupport(index) {
  shown = index;
  const stage = $("stage");
  stage.classList.toggle("empty", index < 0);
  for (const canvas of [$("picture"), $("canvas")]) { canvas.width = 0; canvas.height = 0; }
  if (index >= 0) {
    const entry = supports[index];
    const zoom = Math.max(1, Math.floor(STAGE / Math.max(entry.width, entry.height)));
    const fit = Math.min(1, (stage.parentElement.clientWidth - 4) / (entry.width * zoom));
    for (const canvas of [$("picture"), $("canvas")]) {
      canvas.width = entry.width; canvas.height = entry.height;
      canvas.style.width = entry.width * zoom * fit + "px";
      canvas.style.height = entry.height * zoom * fit + "px";
    }
    $("picture").getContext("2d").drawImage(entry.bitmap, 0, 0);
    drawLabels();
  }
  renderThumbs();
}

function rgbOf(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

function drawLabels(box) {
  if (shown < 0) return;
  const entry = supports[shown];
  const [x0, y0, x1, y1] = box || [0, 0, entry.width, entry.height];
  if (x1 <= x0 || y1 <= y0) return;
  const context = $("canvas").getContext("2d");
  const image = context.createImageData(x1 - x0, y1 - y0);
  const colours = classes.map((c) => rgbOf(c.colour));
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const label = entry.labels[y * entry.width + x];
      const at = ((y - y0) * (x1 - x0) + (x - x0)) * 4;
      const colour = colours[label];
      if (label === IGNORE || !colour) continue;
      image.data.set(colour, at); image.data[at + 3] = 255;
    }
  }
  context.putImageData(image, x0, y0);
}

function pixelCentre(event) {
  const entry = supports[shown];
  const rect = $("canvas").getBoundingClientRect();
  const x = (event.clientX - rect.left) * entry.width / rect.width;
  const y = (event.clientY - rect.top) * entry.height / rect.height;
  const clamp = (v, n) => Math.min(n - 1, Math.max(0, Math.floor(v))) + 0.5;
  return [clamp(x, entry.width), clamp(y, entry.height)];
}

function paintSegment(a, b) {
  // every pixel whose centre is within the radius of the segment a-b takes the label
  const entry = supports[shown];
  const radius = Number($("brush").value);
  const label = tool === "eraser" ? IGNORE : current;
  const x0 = Math.max(0, Math.floor(Math.min(a[0], b[0]) - radius));
  const y0 = Math.max(0, Math.floor(Math.min(a[1], b[1]) - radius));
  const x1 = Math.min(entry.width, Math.ceil(Math.max(a[0], b[0]) + radius) + 1);
  const y1 = Math.min(entry.height, Math.ceil(Math.max(a[1], b[1]) + radius) + 1);
  const dx = b[0] - a[0], dy = b[1] - a[1], length2 = dx * dx + dy * dy;
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const px = x + 0.5, py = y + 0.5;
      const t = length2 ? Math.min(1, Math.max(0, ((px - a[0]) * dx + (py - a[1]) * dy) / length2)) : 0;
      const ex = px - (a[0] + t * dx), ey = py - (a[1] + t * dy);
      if (ex * ex + ey * ey <= radius * radius) entry.labels[y * entry.width + x] = label;
    }
  }
  drawLabels([x0, y0, x1, y1]);
}

let last = null;
function strokeStart(event) {
  if (shown < 0 || event.button !== 0) return;
  event.preventDefault();  // no text selection while dragging
  const entry = supports[shown];
  entry.history.push(entry.labels.slice());
  if (entry.history.length > HISTORY) entry.history.shift();
  $("canvas").setPointerCapture(event.pointerId);
  last = pixelCentre(event);
  paintSegment(last, last);
}
function strokeMove(event) {
  if (last === null) return;
  const point = pixelCentre(event);
  paintSegment(last, point);
  last = point;
}
function strokeEnd() {
  if (last === null) return;
  last = null;
  renderThumbs();
}

function undo() {
  if (shown < 0) return;
  const entry = supports[shown];
  if (!entry.history.length) return;
  entry.labels = entry.history.pop();
  $("canvas").getContext("2d").clearRect(0, 0, entry.width, entry.height);
  drawLabels();
  renderThumbs();
}

function clearPaint() {
  if (shown < 0) return;
  const entry = supports[shown];
  entry.history.push(entry.labels.slice());
  entry.labels.fill(IGNORE);
  $("canvas").getContext("2d").clearRect(0, 0, entry.width, entry.height);
  renderThumbs();
}

function onKey(event) {
  if (event.target.matches("input[type=text], input[type=number], select")) return;
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") { event.preventDefault(); undo(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const brush = $("brush");
  if (/^[1-9]$/.test(event.key)) selectClass(Number(event.key) - 1);
  else if (event.key === "b" || event.key === "B") { tool = "brush"; renderTools(); }
  else if (event.key === "e" || event.key === "E") { tool = "eraser"; renderTools(); }
  else if (event.key === "[") { brush.value = Number(brush.value) - 1; renderTools(); }
  else if (event.key === "]") { brush.value = Number(brush.value) + 1; renderTools(); }
}

// ---- painted masks as grey PNGs -----------------------------------------------------------------------------
const CRC = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC[(c ^ b) & 255] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}
async function maskPNG(labels, width, height) {
  const raw = new Uint8Array((width + 1) * height);  // filter byte 0, then the row
  for (let y = 0; y < height; y++) raw.set(labels.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const stream = new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"));
  const packed = new Uint8Array(await new Response(stream).arrayBuffer());
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width); view.setUint32(4, height); header[8] = 8;  // 8-bit grey
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, chunk("IHDR", header), chunk("IDAT", packed), chunk("IEND", new Uint8Array(0))],
                  { type: "image/png" });
}

// ---- wiring ----------------------------------------------------------------------------------------------
$("support").addEventListener("change", () => chooseSupports([...$("support").files]));
$("canvas").addEventListener("pointerdown", strokeStart);
$("canvas").addEventListener("pointermove", strokeMove);
$("canvas").addEventListener("pointerup", strokeEnd);
$("canvas").addEventListener("pointercancel", strokeEnd);
$("add-class").addEventListener("click", () => {
  classes.push({ name: "class " + classes.length, colour: settings.palette[classes.length % settings.palette.length] });
  renderClasses();
});
$("tool-brush").addEventListener("click", () => { tool = "brush"; renderTools(); });
$("tool-eraser").addEventListener("click", () => { tool = "eraser"; renderTools(); });
$("brush").addEventListener("input", renderTools);
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearPaint);
document.addEventListener("keydown", onKey);
window.neco = {  // for scripts and tests: the painted mask of support image i, as the PNG sent
  maskPNG: async (i) => maskPNG(supports[i].labels, supports[i].width, supports[i].height),
};
"""
