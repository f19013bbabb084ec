// Digit recognition demo: draw on a canvas, get live predictions from the service.
"use strict";

(() => {
  const PREDICT_URL = "/v1/predict/image?return_input=true";
  const THROTTLE_MS = 150; // at most one live request per this many ms while drawing
  const BRUSH = 1 / 13; // brush width as a fraction of the canvas side: a thick pen, like MNIST strokes
  const UNSURE_BELOW = 0.6; // a top probability under this is shown as a doubt, not as an answer
  const RETRY_MS = 3000; // how often to check again while the server is unreachable or not ready
  const PAPER = "#ffffff";
  const INK = "#101318";

  const byId = (id) => document.getElementById(id);
  const pad = byId("pad");
  const ctx = pad.getContext("2d");
  const hint = byId("canvas-hint");
  const undoButton = byId("undo");
  const clearButton = byId("clear");
  const result = byId("result");
  const predictionEl = byId("prediction");
  const confidenceEl = byId("confidence");
  const preview = byId("preview");
  const previewCtx = preview.getContext("2d");
  const statusEl = byId("status");
  const modelInfoEl = byId("model-info");
  const bars = Array.from({ length: 10 }, (_, digit) => {
    const row = document.querySelector(`[data-testid="prob-${digit}"]`);
    return { row, fill: row.querySelector(".bar-fill"), value: row.querySelector(".bar-value") };
  });

  // ---------------------------------------------------------------- drawing

  /** Strokes as lists of [x, y] points in units of the canvas side (0..1), so any resize redraws them exactly. */
  const strokes = [];
  let current = null; // the stroke being drawn, or null
  let activePointer = null; // only one pointer draws at a time
  let side = 0; // backing-store side in device pixels
  let frame = null; // a redraw waiting for the next animation frame

  function usePen() {
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = side * BRUSH;
    ctx.strokeStyle = INK;
    ctx.fillStyle = INK;
  }

  function drawDot([x, y]) {
    usePen();
    ctx.beginPath();
    ctx.arc(x * side, y * side, (side * BRUSH) / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function drawLine(points) {
    if (points.length === 1) {
      drawDot(points[0]);
      return;
    }
    usePen();
    ctx.beginPath();
    ctx.moveTo(points[0][0] * side, points[0][1] * side);
    for (let i = 1; i < points.length; i += 1) {
      ctx.lineTo(points[i][0] * side, points[i][1] * side);
    }
    ctx.stroke();
  }

  function redraw() {
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, pad.width, pad.height);
    for (const stroke of strokes) {
      drawLine(stroke);
    }
    hint.classList.toggle("hidden", strokes.length > 0);
    undoButton.disabled = strokes.length === 0;
  }

  /** Keep the backing store at device resolution (sharp on high-DPI screens) and square. */
  function fitCanvas() {
    const cssSide = pad.getBoundingClientRect().width;
    const pixels = Math.max(1, Math.round(cssSide * (window.devicePixelRatio || 1)));
    if (pixels !== pad.width || pixels !== pad.height) {
      pad.width = pixels;
      pad.height = pixels;
      side = pixels;
      redraw();
    }
  }

  function pointOf(event) {
    const rect = pad.getBoundingClientRect();
    return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
  }

  pad.addEventListener("pointerdown", (event) => {
    if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) {
      return;
    }
    event.preventDefault();
    activePointer = event.pointerId;
    pad.setPointerCapture(event.pointerId);
    current = [pointOf(event)];
    strokes.push(current);
    drawDot(current[0]);
    hint.classList.add("hidden");
    undoButton.disabled = false;
    requestPrediction(false);
  });

  pad.addEventListener("pointermove", (event) => {
    if (event.pointerId !== activePointer || current === null) {
      return;
    }
    const coalesced = typeof event.getCoalescedEvents === "function" ? event.getCoalescedEvents() : [];
    let moved = false;
    for (const sample of coalesced.length > 0 ? coalesced : [event]) {
      const point = pointOf(sample);
      const last = current[current.length - 1];
      if (Math.hypot(point[0] - last[0], point[1] - last[1]) * side < 0.5) {
        continue; // under half a device pixel: nothing to draw
      }
      current.push(point);
      moved = true;
    }
    if (moved) {
      redrawSoon();
      requestPrediction(false);
    }
  });

  /** Redraw once per frame: each stroke is then one path, smooth where segments join. */
  function redrawSoon() {
    if (frame === null) {
      frame = requestAnimationFrame(() => {
        frame = null;
        redraw();
      });
    }
  }

  function endStroke(event) {
    if (event.pointerId !== activePointer) {
      return;
    }
    activePointer = null;
    if (current !== null) {
      current = null;
      requestPrediction(true);
    }
  }

  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);
  pad.addEventListener("lostpointercapture", endStroke);

  function clearAll() {
    strokes.length = 0;
    current = null;
    redraw();
    forgetPrediction();
  }

  function undo() {
    if (strokes.length === 0) {
      return;
    }
    strokes.pop();
    current = null; // undoing mid-stroke drops that stroke; the rest of the drag draws nothing
    redraw();
    if (strokes.length === 0) {
      forgetPrediction();
    } else {
      discardAnswersInFlight();
      requestPrediction(true);
    }
  }

  clearButton.addEventListener("click", clearAll);
  undoButton.addEventListener("click", undo);

  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.altKey) {
      return;
    }
    if ((event.ctrlKey || event.metaKey) && !event.shiftKey && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
      return;
    }
    if (event.key === " " && !event.ctrlKey && !event.metaKey) {
      if (event.target instanceof Element && event.target.closest("button, a, input, select, textarea")) {
        return; // Space activates the focused control instead
      }
      event.preventDefault(); // and does not scroll the page
      clearAll();
    }
  });

  // ------------------------------------------------------------- prediction

  let sequence = 0; // numbers requests; clear and undo bump it too, so answers to older drawings are dropped
  let inFlight = false;
  let wanted = false; // the drawing changed since the last request was sent
  let urgent = false; // a stroke ended: send without waiting for the throttle
  let timer = null;
  let lastSentAt = -Infinity;

  function discardAnswersInFlight() {
    sequence += 1;
  }

  function updateBusy() {
    // Busy while a request is in flight or a newer drawing (e.g. the end of a stroke) waits to be sent.
    result.setAttribute("aria-busy", inFlight || wanted ? "true" : "false");
  }

  function forgetPrediction() {
    discardAnswersInFlight();
    wanted = false;
    urgent = false;
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    updateBusy();
    showNoPrediction();
  }

  function requestPrediction(strokeEnded) {
    if (strokes.length === 0) {
      return;
    }
    wanted = true;
    urgent = urgent || strokeEnded;
    updateBusy();
    scheduleSend();
  }

  function scheduleSend() {
    if (!wanted || inFlight) {
      return; // an answer in flight sends the next request when it lands
    }
    const wait = urgent ? 0 : Math.max(0, lastSentAt + THROTTLE_MS - performance.now());
    if (timer !== null) {
      if (!urgent) {
        return;
      }
      clearTimeout(timer);
    }
    timer = setTimeout(send, wait);
  }

  function send() {
    timer = null;
    if (!wanted || inFlight || strokes.length === 0) {
      if (strokes.length === 0) {
        wanted = false;
      }
      updateBusy();
      return;
    }
    wanted = false;
    urgent = false;
    inFlight = true;
    lastSentAt = performance.now();
    sequence += 1;
    const id = sequence;
    updateBusy();
    if (frame !== null) {
      cancelAnimationFrame(frame); // send what has been drawn, not what was on screen a frame ago
      frame = null;
      redraw();
    }
    pad.toBlob((blob) => {
      predict(blob, id).finally(() => {
        inFlight = false;
        updateBusy();
        scheduleSend();
      });
    }, "image/png");
  }

  async function predict(blob, id) {
    let response;
    try {
      if (blob === null) {
        throw new Error("the drawing could not be encoded as PNG");
      }
      response = await fetch(PREDICT_URL, { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
    } catch {
      if (id === sequence) {
        showNoPrediction();
        setStatus("error", "Server unreachable: the prediction request failed. Is the service running?");
        watchServer();
      }
      return;
    }
    const body = await readJson(response);
    if (id !== sequence) {
      return; // the drawing was cleared or undone meanwhile: a stale answer
    }
    if (!response.ok) {
      showNoPrediction();
      setStatus("error", `Prediction failed: ${errorMessage(response, body)}`);
      if (response.status === 503) {
        watchServer();
      }
      return;
    }
    showPrediction(body);
    setStatus("ok", "Ready: draw a digit");
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  function errorMessage(response, body) {
    if (body && typeof body.message === "string" && body.message) {
      return body.message;
    }
    return `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  }

  // ---------------------------------------------------------------- display

  function percent(p) {
    if (p >= 0.9995) {
      return ">99.9%";
    }
    if (p > 0 && p < 0.0005) {
      return "<0.1%";
    }
    return `${(p * 100).toFixed(1)}%`;
  }

  function showNoPrediction() {
    predictionEl.textContent = "";
    predictionEl.classList.remove("unsure");
    confidenceEl.textContent = "";
    confidenceEl.classList.remove("unsure");
    for (const bar of bars) {
      bar.row.classList.remove("top");
      bar.fill.style.width = "0%";
      bar.value.textContent = "–";
    }
    previewCtx.clearRect(0, 0, preview.width, preview.height);
  }

  function showPrediction(body) {
    if (body === null || body.digit === null || body.digit === undefined || !Array.isArray(body.probabilities)) {
      showNoPrediction(); // e.g. too little ink yet: the server found no digit
      return;
    }
    const ranked = body.probabilities.map((p, digit) => [p, digit]).sort((a, b) => b[0] - a[0]);
    const [top, second] = ranked;
    const unsure = top[0] < UNSURE_BELOW;
    predictionEl.textContent = String(body.digit);
    predictionEl.classList.toggle("unsure", unsure);
    confidenceEl.textContent = unsure
      ? `not sure: ${top[1]} or ${second[1]}?`
      : `confidence ${percent(body.confidence ?? top[0])}`;
    confidenceEl.classList.toggle("unsure", unsure);
    body.probabilities.forEach((p, digit) => {
      const bar = bars[digit];
      bar.row.classList.toggle("top", digit === body.digit);
      bar.fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      bar.value.textContent = percent(p);
    });
    drawPreview(body.input);
  }

  /** The 28x28 image the model saw (white digit on black), scaled up by CSS with nearest-neighbour. */
  function drawPreview(input) {
    if (!Array.isArray(input) || input.length === 0) {
      previewCtx.clearRect(0, 0, preview.width, preview.height);
      return;
    }
    const rows = input.length;
    const cols = input[0].length;
    preview.width = cols;
    preview.height = rows;
    const image = previewCtx.createImageData(cols, rows);
    for (let y = 0; y < rows; y += 1) {
      for (let x = 0; x < cols; x += 1) {
        const level = Math.round(Math.max(0, Math.min(1, input[y][x])) * 255);
        const at = (y * cols + x) * 4;
        image.data[at] = level;
        image.data[at + 1] = level;
        image.data[at + 2] = level;
        image.data[at + 3] = 255;
      }
    }
    previewCtx.putImageData(image, 0, 0);
  }

  function setStatus(state, message) {
    statusEl.dataset.state = state;
    statusEl.textContent = message;
  }

  // ------------------------------------------------------- server and model

  let watching = null;

  function watchServer() {
    if (watching === null) {
      watching = setTimeout(checkServer, RETRY_MS);
    }
  }

  async function checkServer() {
    watching = null;
    let ready;
    try {
      ready = await fetch("/readyz", { cache: "no-store" });
    } catch {
      setStatus("error", "Server unreachable. Retrying…");
      watchServer();
      return;
    }
    if (!ready.ok) {
      const body = await readJson(ready);
      const why = body && body.detail ? `: ${body.detail}` : "";
      setStatus("error", `Server not ready${why}. Retrying…`);
      watchServer();
      return;
    }
    const wasDown = statusEl.dataset.state !== "ok";
    setStatus("ok", "Ready: draw a digit");
    await loadModelInfo();
    if (wasDown && strokes.length > 0) {
      requestPrediction(true); // the server is back: recognise what is on the canvas
    }
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("/v1/model", { cache: "no-store" });
      const info = await readJson(response);
      if (!response.ok || info === null) {
        throw new Error(errorMessage(response, info));
      }
      const name = document.createElement("strong");
      name.textContent = info.name;
      const accuracy =
        typeof info.test_accuracy === "number" ? ` · ${(info.test_accuracy * 100).toFixed(2)}% test accuracy` : "";
      modelInfoEl.replaceChildren("Model ", name, ` v${info.version}${accuracy}`);
    } catch {
      modelInfoEl.textContent = "Model details unavailable";
    }
  }

  // ---------------------------------------------------------------- start

  if (/Mac OS X|iPhone|iPad/.test(navigator.userAgent)) {
    byId("undo-key").textContent = "⌘Z";
  }

  new ResizeObserver(fitCanvas).observe(pad);
  window.addEventListener("resize", fitCanvas); // also catches devicePixelRatio changes (zoom, other screen)
  fitCanvas();
  showNoPrediction();
  checkServer();
})();
