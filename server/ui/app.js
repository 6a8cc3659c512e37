// The digit page: draw or pick a digit, send it to the KServe v2 REST API, show the answer.
//
// A drawing is kept as strokes (lists of points), not as the canvas' pixels: the model's
// input is drawn again from them the way MNIST's digits were made, with a pen of a fixed
// width in the result, scaled so that the digit fits a 20x20 box, anti-aliased, then
// moved so that its centre of mass sits at the centre of the 28x28 image.
// For scripts: window.mnistPage.lastInput holds the 784 pixels last sent.
"use strict";

const SIDE = 28; // the model's image side
const BOX = 20; // MNIST scaled each digit to fit this box
const PEN = 2.4; // pen width in model pixels (MNIST strokes are 2-3 pixels wide)
const SUPER = 8; // supersampling factor for anti-aliasing
const SCREEN_PEN = 18; // pen width on the 280x280 drawing canvas

const state = {
  model: "mnist",
  strokes: [], // [[{x, y}, ...], ...] in drawing-canvas pixels
  drawing: null, // the stroke being drawn
  seq: 0, // the latest request; older answers are dropped
  lastInput: null,
};
window.mnistPage = state;

const $ = (id) => document.getElementById(id);
const canvas = $("digit");
const ctx = canvas.getContext("2d");

// --- preparing the model's input -------------------------------------------------------

function render(strokes, scale, dx, dy) {
  // The strokes drawn into a SIDE x SIDE grid, supersampled; returns coverage in [0, 1].
  const big = SIDE * SUPER;
  const off = new OffscreenCanvas(big, big);
  const g = off.getContext("2d", { willReadFrequently: true });
  g.fillStyle = "black";
  g.fillRect(0, 0, big, big);
  g.strokeStyle = g.fillStyle = "white";
  g.lineWidth = PEN * SUPER;
  g.lineCap = g.lineJoin = "round";
  const at = (p) => [(p.x * scale + dx) * SUPER, (p.y * scale + dy) * SUPER];
  for (const stroke of strokes) {
    g.beginPath();
    if (stroke.length === 1) {
      const [x, y] = at(stroke[0]);
      g.arc(x, y, (PEN * SUPER) / 2, 0, 2 * Math.PI);
      g.fill();
      continue;
    }
    g.moveTo(...at(stroke[0]));
    for (const p of stroke.slice(1)) g.lineTo(...at(p));
    g.stroke();
  }
  const rgba = g.getImageData(0, 0, big, big).data;
  const out = new Float32Array(SIDE * SIDE);
  for (let y = 0; y < big; y++) {
    for (let x = 0; x < big; x++) {
      out[Math.floor(y / SUPER) * SIDE + Math.floor(x / SUPER)] += rgba[(y * big + x) * 4];
    }
  }
  return out.map((v) => v / (255 * SUPER * SUPER));
}

function centreOfMass(image) {
  let mass = 0, mx = 0, my = 0;
  image.forEach((v, i) => {
    mass += v;
    mx += v * ((i % SIDE) + 0.5);
    my += v * (Math.floor(i / SIDE) + 0.5);
  });
  return [mx / mass, my / mass];
}

function prepare(strokes) {
  // The 784 uint8 pixels MNIST would have made of these strokes.
  const points = strokes.flat();
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const extent = Math.max(x1 - x0, y1 - y0);
  // The ink (the points' box plus the pen around it) fills the 20x20 box's longer side.
  const scale = extent > 0 ? (BOX - PEN) / extent : 1;
  let dx = SIDE / 2 - ((x0 + x1) / 2) * scale;
  let dy = SIDE / 2 - ((y0 + y1) / 2) * scale;
  const [cx, cy] = centreOfMass(render(strokes, scale, dx, dy));
  dx += SIDE / 2 - cx;
  dy += SIDE / 2 - cy;
  return Array.from(render(strokes, scale, dx, dy), (v) => Math.round(Math.min(1, v) * 255));
}

// --- drawing -------------------------------------------------------------------------

function clearCanvas() {
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * canvas.width) / box.width,
    y: ((event.clientY - box.top) * canvas.height) / box.height,
  };
}

function paint(from, to) {
  ctx.strokeStyle = ctx.fillStyle = "white";
  ctx.lineWidth = SCREEN_PEN;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  if (from === to) {
    ctx.arc(from.x, from.y, SCREEN_PEN / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }
}

canvas.addEventListener("pointerdown", (event) => {
  if (state.strokes.length === 0) clearCanvas(); // a shown test image goes away
  canvas.setPointerCapture(event.pointerId);
  const p = point(event);
  state.drawing = [p];
  paint(p, p);
});

canvas.addEventListener("pointermove", (event) => {
  if (!state.drawing) return;
  const p = point(event);
  paint(state.drawing[state.drawing.length - 1], p);
  state.drawing.push(p);
});

function endStroke() {
  if (!state.drawing) return;
  state.strokes.push(state.drawing);
  state.drawing = null;
  chooseSample(null);
  classify(prepare(state.strokes), `drawing:${state.strokes.length}`);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

$("clear").addEventListener("click", () => {
  state.strokes = [];
  state.seq++;
  chooseSample(null);
  clearCanvas();
  showInput(null);
  showAnswer(null, "");
});

// --- talking to the server -----------------------------------------------------------

function modelPath() {
  const version = $("version").value;
  const name = encodeURIComponent(state.model);
  return version ? `/v2/models/${name}/versions/${encodeURIComponent(version)}` : `/v2/models/${name}`;
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
  return answer;
}

async function classify(pixels, source) {
  const seq = ++state.seq;
  state.lastInput = pixels;
  showInput(pixels);
  const path = modelPath() + "/infer";
  $("endpoint").textContent = `POST ${path}`;
  try {
    const answer = await call(path, {
      inputs: [{ name: "images", shape: [1, SIDE, SIDE], datatype: "UINT8", data: pixels }],
    });
    if (seq !== state.seq) return; // a newer drawing is on its way
    const output = (name) => answer.outputs.find((o) => o.name === name).data;
    showAnswer({
      digit: output("classes")[0],
      probabilities: output("probabilities"),
      version: answer.model_version,
    }, source);
    $("status").textContent = "";
  } catch (error) {
    if (seq === state.seq) $("status").textContent = `The server said: ${error.message}`;
  }
}

async function loadVersions() {
  try {
    const metadata = await call(`/v2/models/${encodeURIComponent(state.model)}`);
    const select = $("version");
    const pinned = select.value;
    const versions = metadata.versions.map(String).sort((a, b) => Number(b) - Number(a));
    select.replaceChildren(new Option(`newest (${versions[0]})`, ""));
    for (const v of versions) select.add(new Option(`${v}`, v));
    select.value = versions.includes(pinned) ? pinned : "";
    $("loaded-versions").textContent =
      `loaded: ${versions.join(", ")} · ${metadata.platform}`;
  } catch (error) {
    $("status").textContent = `Cannot read the model's versions: ${error.message}`;
  }
}

$("version").addEventListener("change", () => {
  if (state.lastInput) classify(state.lastInput, $("predicted-class").dataset.source);
});

// --- showing -------------------------------------------------------------------------

const bars = [];
for (let digit = 0; digit < 10; digit++) {
  const item = document.createElement("li");
  item.innerHTML =
    `<span class="digit">${digit}</span><span class="bar"><span class="fill"></span></span>` +
    `<span class="value">–</span>`;
  $("bars").append(item);
  bars.push(item);
}

function showAnswer(answer, source) {
  const shown = $("predicted-class");
  shown.dataset.source = source;
  shown.textContent = answer ? String(answer.digit) : "–";
  $("confidence").textContent = answer
    ? `${(answer.probabilities[answer.digit] * 100).toFixed(1)}% sure` : "";
  $("answered-by").textContent = answer ? `answered by version ${answer.version}` : "";
  bars.forEach((item, digit) => {
    const p = answer ? answer.probabilities[digit] : 0;
    item.querySelector(".fill").style.width = `${(p * 100).toFixed(1)}%`;
    item.querySelector(".value").textContent = answer ? `${(p * 100).toFixed(1)}%` : "–";
    item.classList.toggle("top", answer !== null && digit === answer.digit);
  });
}

function paintPixels(target, pixels) {
  const g = target.getContext("2d");
  const image = g.createImageData(SIDE, SIDE);
  pixels.forEach((v, i) => {
    image.data.set([v, v, v, 255], i * 4);
  });
  g.putImageData(image, 0, 0);
}

function showInput(pixels) {
  const target = $("model-input");
  if (pixels) paintPixels(target, pixels);
  else target.getContext("2d").clearRect(0, 0, SIDE, SIDE);
}

// --- real test images ----------------------------------------------------------------

function chooseSample(button) {
  for (const b of document.querySelectorAll("#samples button")) {
    b.classList.toggle("chosen", b === button);
  }
}

async function loadSamples() {
  const { samples } = await call("/ui/samples.json");
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.index = sample.index;
    button.title = `test image #${sample.index}` +
      (sample.label === null ? "" : `, labelled ${sample.label}`);
    const thumb = document.createElement("canvas");
    thumb.width = thumb.height = SIDE;
    paintPixels(thumb, sample.pixels);
    const caption = document.createElement("span");
    caption.textContent = sample.label === null ? `#${sample.index}` : `${sample.label}`;
    button.append(thumb, caption);
    button.addEventListener("click", () => {
      state.strokes = [];
      chooseSample(button);
      clearCanvas();
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(thumb, 0, 0, canvas.width, canvas.height);
      classify(sample.pixels, `sample:${sample.index}`);
    });
    $("samples").append(button);
  }
  $("samples-panel").hidden = false;
}

// --- start ---------------------------------------------------------------------------

async function start() {
  clearCanvas();
  const config = await call("/ui/config.json");
  state.model = config.model_name;
  $("model-name").textContent = state.model;
  $("endpoint").textContent = `POST ${modelPath()}/infer`;
  await loadVersions();
  setInterval(loadVersions, 10000);
  if (config.samples > 0) await loadSamples();
  document.body.dataset.ready = "true";
}

start().catch((error) => {
  $("status").textContent = `The page could not start: ${error.message}`;
});
