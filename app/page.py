"""The page `neco app` serves: one HTML document with its CSS; the scripts are `neco.app.painter` and `.script`.

Python strings rather than data files so that they ship in every install of the package, and no
frontend build: everything the page needs is served by the app itself (no external resources).
The element ids are the interface the browser test drives: `#examples button`, `#support`,
`#bank`, `#canvas` (the painter), `#classes`, `#query`, `#size-mode`, `#run`, `#error`,
`#gallery .card`, `#bank-download`; `body[data-state]` is `idle`, `busy`, `done` or `error`.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NeCo in-context segmentation</title>
<style>
  :root { --line: #d5d8de; --muted: #5b6270; --accent: #1f5fbf; }
  * { box-sizing: border-box; }
  body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
  header { padding: 0.8rem 1.2rem 0.4rem; background: #fff; border-bottom: 1px solid var(--line); }
  h1 { font-size: 1.3rem; margin: 0 0 0.2rem; }
  h2 { font-size: 1.05rem; margin: 0 0 0.6rem; }
  h3 { font-size: 0.95rem; margin: 0 0 0.4rem; font-weight: 600; word-break: break-all; }
  .hint { color: var(--muted); font-size: 0.88rem; margin: 0.2rem 0 0.5rem; }
  main { display: grid; grid-template-columns: 1fr; gap: 1rem; padding: 1rem 1.2rem; }
  @media (min-width: 1100px) { main { grid-template-columns: minmax(26rem, 1fr) minmax(30rem, 1.25fr); } }
  .panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 0.9rem 1rem; min-width: 0; }
  .row { display: flex; flex-wrap: wrap; gap: 0.5rem 1.2rem; align-items: center; margin-bottom: 0.6rem; }
  label { font-size: 0.9rem; }
  button { font: inherit; font-size: 0.88rem; padding: 0.25rem 0.6rem; border: 1px solid var(--line); border-radius: 5px;
           background: #fff; cursor: pointer; }
  button[aria-pressed="true"] { background: #e6eefb; border-color: var(--accent); }
  button#run { background: var(--accent); color: #fff; border-color: var(--accent); padding: 0.35rem 1.1rem; }
  button:disabled { opacity: 0.5; cursor: default; }
  #examples { display: flex; flex-wrap: wrap; gap: 0.6rem; margin: 0.3rem 0 0.4rem; }
  #examples button { display: flex; align-items: center; gap: 0.5rem; }
  #examples img { width: 40px; height: 40px; image-rendering: pixelated; border-radius: 3px; }
  .thumbs { display: flex; flex-wrap: wrap; gap: 0.4rem; margin: 0.3rem 0 0.6rem; }
  .thumbs img { height: 56px; image-rendering: pixelated; border: 2px solid transparent; border-radius: 4px; }
  .thumbs img.current { border-color: var(--accent); }
  .thumbs img.painted { outline: 2px solid #2a9d4b; outline-offset: 1px; }
  #classes { display: flex; flex-direction: column; gap: 0.25rem; margin-bottom: 0.5rem; }
  .class-row { display: flex; align-items: center; gap: 0.4rem; }
  .class-row input[type=text] { width: 11rem; font: inherit; font-size: 0.88rem; padding: 0.15rem 0.3rem; }
  .class-row input[type=color] { width: 2rem; height: 1.6rem; padding: 0; border: 1px solid var(--line); }
  kbd { font-size: 0.75rem; border: 1px solid var(--line); border-radius: 3px; padding: 0 0.3rem; color: var(--muted); }
  .tools { display: flex; flex-wrap: wrap; gap: 0.4rem 0.6rem; align-items: center; margin-bottom: 0.6rem; }
  #stage { position: relative; display: inline-block; line-height: 0; background: #eceef1; user-select: none; }
  #stage canvas { image-rendering: pixelated; display: block; }
  #canvas { position: absolute; left: 0; top: 0; opacity: 0.6; cursor: crosshair; touch-action: none; }
  #stage.empty { width: 100%; height: 8rem; }
  #stage.empty::after { content: "choose support images or click an example"; position: absolute; inset: 0;
    display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 0.9rem;
    line-height: 1.2; }
  .controls { display: flex; flex-wrap: wrap; gap: 0.5rem 1rem; align-items: center; margin: 0.6rem 0; }
  .controls input[type=number] { width: 5.5rem; }
  #error { color: #a40000; font-weight: 600; white-space: pre-wrap; margin: 0.4rem 0; }
  #status { color: var(--muted); font-size: 0.9rem; }
  #result { display: none; }
  body[data-state="done"] #result { display: block; }
  body[data-state="done"] #placeholder { display: none; }
  #summary { font-size: 0.9rem; margin: 0.2rem 0 0.4rem; }
  .legend { list-style: none; padding: 0; margin: 0.3rem 0; display: flex; flex-wrap: wrap; gap: 0.3rem 1rem;
            font-size: 0.9rem; align-items: center; }
  .swatch { display: inline-block; width: 0.9rem; height: 0.9rem; border: 1px solid #0008; vertical-align: -0.1rem;
            margin-right: 0.3rem; }
  .heat { display: inline-block; width: 6rem; height: 0.7rem; vertical-align: -0.05rem; margin: 0 0.3rem;
          background: linear-gradient(to right, #000004, #3c0965, #962667, #e25032, #faa014, #fcffa4); }
  #gallery { display: flex; flex-direction: column; gap: 0.8rem; margin-top: 0.6rem; }
  .card { border: 1px solid var(--line); border-radius: 6px; padding: 0.6rem 0.7rem; }
  .figs { display: flex; flex-wrap: wrap; gap: 0.6rem; }
  figure { margin: 0; }
  figure img { display: block; max-width: 100%; image-rendering: pixelated; border: 1px solid var(--line); }
  figcaption { font-size: 0.8rem; color: var(--muted); }
  .facts { font-size: 0.85rem; color: var(--muted); margin: 0.3rem 0; }
  .note { font-size: 0.85rem; color: #8a4b00; margin: 0.3rem 0; }
  .card a { font-size: 0.85rem; margin-right: 1rem; }
</style>
</head>
<body data-state="idle">
<header>
  <h1>NeCo in-context segmentation</h1>
  <p class="hint">Paint a few strokes of each class on a support image, add query images, and segment them all:
  every query patch takes the labels of its nearest painted patches (k-NN label transfer over dense features).
  Start from an example:</p>
  <nav id="examples" aria-label="examples"></nav>
</header>
<main>
<section class="panel" id="support-panel">
  <h2>1. Support: paint the classes</h2>
  <div class="row">
    <label>support images <input id="support" type="file" multiple accept="image/*,.zip,.json"></label>
    <label>or a saved bank <select id="bank"><option value="">(none: the painted images)</option></select></label>
  </div>
  <div id="support-thumbs" class="thumbs"></div>
  <p id="ready" class="hint"></p>
  <div id="classes"></div>
  <div class="tools">
    <button id="add-class" type="button">+ class</button>
    <button id="tool-brush" type="button" aria-pressed="true">brush <kbd>B</kbd></button>
    <button id="tool-eraser" type="button" aria-pressed="false">eraser <kbd>E</kbd></button>
    <label>size <input id="brush" type="range" min="1" max="128" value="4"> <output id="brush-size">4</output> px
      <kbd>[</kbd> <kbd>]</kbd></label>
    <button id="undo" type="button">undo <kbd>Ctrl+Z</kbd></button>
    <button id="clear" type="button">clear</button>
  </div>
  <div id="stage" class="empty"><canvas id="picture"></canvas><canvas id="canvas"></canvas></div>
  <p class="hint">Keys: <kbd>1</kbd>-<kbd>9</kbd> class, <kbd>B</kbd> brush, <kbd>E</kbd> eraser, <kbd>[</kbd>
  <kbd>]</kbd> brush size, <kbd>Ctrl+Z</kbd> undo. Unpainted pixels are ignored (label 255); only painted
  support images make the bank.</p>
</section>
<section class="panel" id="query-panel">
  <h2>2. Queries: segment them all</h2>
  <div class="row"><label>query images <input id="query" type="file" multiple accept="image/*"></label></div>
  <div id="query-thumbs" class="thumbs"></div>
  <div class="controls">
    <label>encoder size <select id="size-mode">
      <option value="">auto (the support images' own size)</option>
      <option value="112">112 px</option><option value="224">224 px</option><option value="448">448 px</option>
      <option value="custom">other</option></select>
      <input id="size" type="number" min="14" max="4096" step="14" hidden></label>
    <label>neighbours k <input id="k" type="number" min="1" max="1024" step="1"></label>
    <label>temperature <input id="temperature" type="number" min="0.0001" step="any"></label>
    <label>edges <select id="upsample"><option value="guided">guided by the image</option>
      <option value="bilinear">bilinear (Hummingbird)</option></select></label>
    <button id="run" type="button">Segment</button> <span id="status"></span>
  </div>
  <p id="error" role="alert"></p>
  <p id="placeholder" class="hint">Results appear here, one card per query: the query, the prediction (colours as
  in the class list), the confidence map, the features' first principal components and the mask PNG to download,
  with the size the encoder ran at and the patches and k it used.</p>
  <section id="result">
    <p id="summary"></p>
    <ul id="legend" class="legend"></ul>
    <p class="facts">confidence of the chosen class: 0 <span class="heat"></span> 1 &middot;
      <a id="bank-download" download="bank.zip">download the bank (zip)</a>
      <span>unzip it, then <code>neco segment IMAGE --bank FOLDER --out mask.png</code> or <code>MemoryBank.load(FOLDER)</code></span></p>
    <div id="gallery"></div>
  </section>
</section>
</main>
<script src="paint.js"></script>
<script src="page.js"></script>
</body>
</html>
"""
