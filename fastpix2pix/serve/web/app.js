// fastpix2pix serve: draw on the canvas; every finished stroke posts it (PNG) to /translate.
// Plain JavaScript, no library and no request to anywhere but this server.
"use strict";

(() => {
  const DEBOUNCE_MS = 150; // quick successive strokes make one request, not one each
  const UNDO_BUDGET_BYTES = 256 * 1024 * 1024; // undo steps kept (RGBA snapshots) within this memory
  const TOOL_SIZES = { brush: 8, rect: 8, pen: 2, eraser: 14 }; // diameters in canvas pixels
  const DEFAULT_TOOL = { labels: "brush", outline: "pen" };
  const BITMAP_OPTIONS = { colorSpaceConversion: "none", premultiplyAlpha: "none" }; // pixels as stored

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const overlay = $("overlay");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const octx = overlay.getContext("2d");

  // Page state, also readable from the console (and by the browser test) as window.fastpix2pix.
  const state = {
    info: null,
    mode: "labels",
    palette: null, // {name, classes: [{name, color}]}
    classIndex: 0,
    tool: "brush",
    sizes: { ...TOOL_SIZES },
    undo: [],
    stroke: null,
    timer: null,
    inFlight: false,
    dirty: false,
    translations: 0,
    outputURL: null,
  };
  window.fastpix2pix = state;

  // --- drawing ----------------------------------------------------------------------------------------

  function drawColour() {
    if (state.mode === "outline") return state.tool === "eraser" ? "#ffffff" : "#000000";
    return state.palette.classes[state.classIndex].color;
  }

  function backgroundColour() {
    return state.mode === "outline" ? "#ffffff" : state.palette.classes[0].color;
  }

  // A disc of whole pixels (row by row with integer rectangles): no anti-aliasing, so a label map
  // holds only palette colours, as the training label maps do.
  function stamp(cx, cy, diameter) {
    const r = diameter / 2;
    const top = Math.round(cy - r);
    for (let j = 0; j < diameter; j++) {
      const dy = top + j + 0.5 - cy;
      const w = Math.sqrt(Math.max(0, r * r - dy * dy));
      const x0 = Math.round(cx - w);
      const x1 = Math.max(Math.round(cx + w), x0 + (diameter <= 2 ? 1 : 0));
      if (x1 > x0) ctx.fillRect(x0, top + j, x1 - x0, 1);
    }
  }

  function strokeTo(from, to) {
    const diameter = state.sizes[state.tool];
    const distance = Math.hypot(to.x - from.x, to.y - from.y);
    const steps = Math.max(1, Math.ceil(distance / Math.max(1, diameter / 4)));
    ctx.fillStyle = drawColour();
    for (let i = 1; i <= steps; i++) {
      const t = i / steps;
      stamp(from.x + (to.x - from.x) * t, from.y + (to.y - from.y) * t, diameter);
    }
  }

  function rectangleOf(a, b) {
    const x0 = Math.floor(Math.min(a.x, b.x));
    const y0 = Math.floor(Math.min(a.y, b.y));
    return [x0, y0, Math.floor(Math.max(a.x, b.x)) - x0 + 1, Math.floor(Math.max(a.y, b.y)) - y0 + 1];
  }

  function previewRectangle(a, b) {
    octx.clearRect(0, 0, overlay.width, overlay.height);
    octx.globalAlpha = 0.6;
    octx.fillStyle = drawColour();
    octx.fillRect(...rectangleOf(a, b));
    octx.globalAlpha = 1;
  }

  function canvasPoint(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  }

  function onPointerDown(event) {
    if (event.button !== 0 || !state.palette) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    pushUndo();
    const point = canvasPoint(event);
    state.stroke = { start: point, last: point };
    if (state.tool !== "rect") strokeTo(point, point);
  }

  function onPointerMove(event) {
    if (!state.stroke) return;
    const point = canvasPoint(event);
    if (state.tool === "rect") previewRectangle(state.stroke.start, point);
    else strokeTo(state.stroke.last, point);
    state.stroke.last = point;
  }

  function onPointerUp(event) {
    if (!state.stroke) return;
    const point = event.type === "pointercancel" ? state.stroke.last : canvasPoint(event);
    if (state.tool === "rect") {
      octx.clearRect(0, 0, overlay.width, overlay.height);
      ctx.fillStyle = drawColour();
      ctx.fillRect(...rectangleOf(state.stroke.start, point));
    } else {
      strokeTo(state.stroke.last, point);
    }
    state.stroke = null;
    scheduleTranslate();
  }

  // --- canvas contents ---------------------------------------------------------------------------------

  function setCanvasSize(width, height) {
    for (const c of [canvas, overlay]) {
      c.width = width;
      c.height = height;
    }
    const m = state.info.size_multiple;
    const padded = (side) => Math.max(m, Math.ceil(side / m) * m);
    const note = padded(width) === width && padded(height) === height
      ? `${width}×${height}`
      : `${width}×${height}, reflect-padded to ${padded(width)}×${padded(height)} for the model`;
    $("input-size").textContent = note;
  }

  function fillBackground() {
    ctx.fillStyle = backgroundColour();
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  function pushUndo() {
    state.undo.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
    let bytes = state.undo.reduce((sum, snapshot) => sum + snapshot.data.length, 0);
    while (bytes > UNDO_BUDGET_BYTES && state.undo.length > 1) bytes -= state.undo.shift().data.length;
  }

  function undo() {
    const snapshot = state.undo.pop();
    if (!snapshot) return;
    if (snapshot.width !== canvas.width || snapshot.height !== canvas.height) {
      setCanvasSize(snapshot.width, snapshot.height);
    }
    ctx.putImageData(snapshot, 0, 0);
    scheduleTranslate();
  }

  function clearCanvas() {
    pushUndo();
    fillBackground();
    scheduleTranslate();
  }

  async function drawImageFile(blob) {
    const bitmap = await createImageBitmap(blob, BITMAP_OPTIONS);
    setCanvasSize(bitmap.width, bitmap.height);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, bitmap.width, bitmap.height);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
  }

  async function loadSample() {
    const response = await fetch(state.info.sample);
    if (!response.ok) throw new Error(`the sample could not be loaded (${response.status})`);
    pushUndo();
    await drawImageFile(await response.blob());
  }

  async function upload(file) {
    const { max_bytes: maxBytes, max_pixels: maxPixels } = state.info.limits;
    const bitmap = await createImageBitmap(file, BITMAP_OPTIONS).catch(() => null);
    if (!bitmap) return showStatus(`${file.name} is not an image this browser can read`, true);
    const pixels = bitmap.width * bitmap.height;
    bitmap.close();
    if (pixels > maxPixels || file.size > maxBytes) {
      return showStatus(`${file.name} is larger than the server accepts (${maxPixels} pixels, ${maxBytes} bytes)`, true);
    }
    pushUndo();
    await drawImageFile(file);
    // The file itself goes to the model first: decoded by the server exactly as `predict` reads it.
    translate(file);
  }

  // --- translation ------------------------------------------------------------------------------------

  function setBusy() {
    document.body.dataset.busy = String(state.inFlight || state.timer !== null);
  }

  function scheduleTranslate() {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => {
      state.timer = null;
      translate();
    }, DEBOUNCE_MS);
    setBusy();
  }

  function canvasPNG() {
    return new Promise((resolve, reject) =>
      canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the canvas could not be encoded"))), "image/png"),
    );
  }

  // One request at a time: strokes made while one is running are sent together when it returns.
  async function translate(body) {
    if (state.inFlight) {
      state.dirty = true;
      return;
    }
    state.inFlight = true;
    state.dirty = false;
    setBusy();
    try {
      await post(body || (await canvasPNG()));
      showStatus("");
    } catch (error) {
      showStatus(error.message, true);
    } finally {
      state.inFlight = false;
      if (state.dirty) translate();
      else setBusy();
    }
  }

  async function post(blob) {
    const started = performance.now();
    const response = await fetch("/translate", {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    if (!response.ok) {
      const reason = await response.json().then((e) => e.error).catch(() => response.statusText);
      throw new Error(`the server refused the image (${response.status}): ${reason}`);
    }
    const image = await response.blob();
    const roundTrip = performance.now() - started;
    await showOutput(image);
    const model = Number(response.headers.get("X-Model-Ms"));
    $("latency").textContent = `model ${model.toFixed(0)} ms · round trip ${roundTrip.toFixed(0)} ms`;
    state.translations += 1;
    document.body.dataset.translations = String(state.translations);
  }

  async function showOutput(blob) {
    const url = URL.createObjectURL(blob);
    const output = $("output");
    output.src = url;
    await output.decode();
    if (state.outputURL) URL.revokeObjectURL(state.outputURL);
    state.outputURL = url;
    const download = $("download");
    download.href = url;
    download.classList.remove("disabled");
    download.setAttribute("aria-disabled", "false");
  }

  function showStatus(message, isError = false) {
    const status = $("status");
    status.textContent = message;
    status.classList.toggle("error", isError);
  }

  // --- controls ---------------------------------------------------------------------------------------

  function setTool(tool) {
    state.tool = tool;
    for (const button of document.querySelectorAll(".tool")) {
      button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
    }
    $("size").value = state.sizes[tool];
    $("size").disabled = tool === "rect";
  }

  function setMode(mode, reset) {
    state.mode = mode;
    $("mode").value = mode;
    for (const button of document.querySelectorAll(".tool")) {
      button.hidden = !button.dataset.modes.split(" ").includes(mode);
    }
    $("palette-picker").hidden = mode !== "labels";
    $("classes").hidden = mode !== "labels";
    setTool(DEFAULT_TOOL[mode]);
    if (reset) clearCanvas(); // a blank page in the new mode; Undo brings the drawing back
  }

  function setPalette(name) {
    state.palette = state.info.palettes.find((p) => p.name === name) || state.info.palettes[0];
    $("palette").value = state.palette.name;
    const names = state.palette.classes.map((c) => c.name);
    const preferred = names.indexOf("window");
    state.classIndex = preferred >= 0 ? preferred : names.length - 1;
    const list = $("classes");
    list.replaceChildren();
    state.palette.classes.forEach((cls, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.index = String(index);
      button.title = `${cls.name} ${cls.color}`;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = cls.color; // CSSOM, allowed by the page's content security policy
      button.append(swatch, cls.name);
      button.addEventListener("click", () => selectClass(index));
      const item = document.createElement("li");
      item.append(button);
      list.append(item);
    });
    selectClass(state.classIndex);
  }

  function selectClass(index) {
    state.classIndex = index;
    for (const button of $("classes").querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(Number(button.dataset.index) === index));
    }
  }

  function bindControls() {
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerUp);
    canvas.addEventListener("pointercancel", onPointerUp);
    for (const button of document.querySelectorAll(".tool")) {
      button.addEventListener("click", () => setTool(button.dataset.tool));
    }
    $("size").addEventListener("input", (e) => (state.sizes[state.tool] = Number(e.target.value)));
    $("mode").addEventListener("change", (e) => setMode(e.target.value, true));
    $("palette").addEventListener("change", (e) => setPalette(e.target.value));
    $("undo").addEventListener("click", undo);
    $("clear").addEventListener("click", clearCanvas);
    $("sample").addEventListener("click", () => loadSample().then(() => translate(), (e) => showStatus(e.message, true)));
    $("upload").addEventListener("change", (e) => {
      const file = e.target.files[0];
      e.target.value = ""; // the same file can be chosen again
      if (file) upload(file);
    });
    document.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "z") {
        e.preventDefault();
        undo();
      }
    });
  }

  function describeModel(info) {
    const m = info.model;
    $("model").textContent =
      `${m.name} · ${m.netG} (ngf ${m.ngf}) · ${info.device} · ${info.protocol} protocol · ` +
      `direction ${m.direction}`;
    const sample = info.sample_source ? ` The sample comes from ${info.sample_source}.` : "";
    $("about").textContent =
      `Weights: ${m.weights}. Mode: ${info.mode} (${info.mode_reason}). ${info.protocol_text}.${sample} ` +
      "The page and the model run on this machine: nothing is sent anywhere else.";
    for (const palette of info.palettes) {
      $("palette").append(new Option(`${palette.name} (${palette.classes.length} classes)`, palette.name));
    }
  }

  async function init() {
    bindControls();
    const response = await fetch("/info");
    state.info = await response.json();
    describeModel(state.info);
    setCanvasSize(state.info.canvas.width, state.info.canvas.height);
    setPalette(state.info.palette);
    setMode(state.info.mode, false);
    if (state.info.sample) {
      $("sample").hidden = false;
      await loadSample();
      state.undo = []; // the sample is the starting point, not a step to undo
    } else {
      fillBackground();
    }
    await translate();
  }

  init().catch((error) => showStatus(`the page could not start: ${error.message}`, true));
})();
