// The page talks to the same server's /v1 API; no build step, no external scripts.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("scene");
const context = canvas.getContext("2d");
const MAX_SIDE = 480;
const state = { blob: null, name: "", image: null, box: null, drag: null };

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function loadCategories() {
  const { categories } = await getJSON("/v1/categories");
  for (const { name, products } of categories) {
    const option = new Option(`${name} (${products})`, name);
    $("category").add(option);
  }
}

async function loadExamples() {
  const { examples } = await getJSON("/v1/examples");
  for (const example of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${example.category}`;
    const thumb = new Image();
    thumb.src = example.image;
    thumb.alt = `example scene ${example.name}`;
    button.append(thumb);
    button.addEventListener("click", () => useExample(example, button));
    $("examples").append(button);
  }
}

async function useExample(example, button) {
  const response = await fetch(example.image);
  await setScene(await response.blob(), `${example.name}.jpg`);
  document.querySelectorAll("#examples button").forEach((b) => b.classList.toggle("chosen", b === button));
  state.box = example.box;
  $("category").value = example.category;
  draw();
}

async function setScene(blob, name) {
  const image = new Image();
  image.src = URL.createObjectURL(blob);
  try {
    await image.decode();
  } catch {
    setStatus(`${name}: this browser cannot show it; it is sent as it is`, true);
  }
  Object.assign(state, { blob, name, image, box: null });
  const scale = MAX_SIDE / Math.max(image.naturalWidth || 1, image.naturalHeight || 1);  // small scenes grow, to draw on
  canvas.width = Math.max(1, Math.round((image.naturalWidth || MAX_SIDE) * scale));
  canvas.height = Math.max(1, Math.round((image.naturalHeight || MAX_SIDE) * scale));
  $("placeholder").hidden = true;
  draw();
}

function draw() {
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (state.image && state.image.naturalWidth) context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const box = state.drag ? ordered(state.drag) : state.box;
  if (box) {
    const [l, t, r, b] = [box[0] * canvas.width, box[1] * canvas.height, box[2] * canvas.width, box[3] * canvas.height];
    context.fillStyle = "rgba(0, 0, 0, 0.35)";  // dim the item to replace: the model does not see it
    context.fillRect(l, t, r - l, b - t);
    context.strokeStyle = "#e22";
    context.lineWidth = 2;
    context.strokeRect(l, t, r - l, b - t);
  }
  $("box-text").textContent = state.box
    ? `Box: ${state.box.map((v) => v.toFixed(3)).join(", ")}`
    : "Box: none (the whole scene is context)";
}

function point(event) {
  const rect = canvas.getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
}

function ordered([x0, y0, x1, y1]) {
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
}

canvas.addEventListener("pointerdown", (event) => {
  if (!state.blob) return;
  canvas.setPointerCapture(event.pointerId);
  state.drag = [...point(event), ...point(event)];
});
canvas.addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  state.drag = [state.drag[0], state.drag[1], ...point(event)];
  draw();
});
canvas.addEventListener("pointerup", () => {
  if (!state.drag) return;
  const box = ordered(state.drag);
  state.drag = null;
  state.box = box[2] - box[0] > 0.01 && box[3] - box[1] > 0.01 ? box : null;  // a click is no box
  draw();
});

$("clear-box").addEventListener("click", () => {
  state.box = null;
  draw();
});

$("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  document.querySelectorAll("#examples button").forEach((b) => b.classList.remove("chosen"));
  setStatus("");
  await setScene(file, file.name);
});

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.blob) {
    setStatus("Choose an example scene or upload one first.", true);
    return;
  }
  const form = new FormData();
  form.append("image", state.blob, state.name);
  form.append("category", $("category").value);
  form.append("k", $("k").value);
  if (state.box) form.append("box", state.box.map((v) => v.toFixed(4)).join(","));
  setStatus("Recommending...");
  $("go").disabled = true;
  try {
    const response = await fetch("/v1/recommend", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) {
      setStatus(`${response.status}: ${answer.detail}`, true);
      return;
    }
    show(answer);
    setStatus(`Top ${answer.products.length} ${answer.category} products, nearest first.`);
  } catch (error) {
    setStatus(`The server did not answer: ${error}`, true);
  } finally {
    $("go").disabled = false;
  }
});

function show(answer) {
  $("attention-figure").hidden = !answer.attention;
  if (answer.attention) $("attention").src = answer.attention;
  const cards = answer.products.map((product) => {
    const card = document.createElement("div");
    card.className = "product";
    const image = new Image();
    image.src = product.image;
    image.alt = `product ${product.id}`;
    image.loading = "lazy";
    const rank = document.createElement("div");
    rank.className = "distance";
    rank.textContent = `${product.rank}. d = ${product.distance.toFixed(4)}`;
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = product.id;
    card.append(image, rank, id);
    return card;
  });
  $("results").replaceChildren(...cards);
}

Promise.all([loadCategories(), loadExamples()]).catch((error) => setStatus(`Cannot reach the API: ${error}`, true));
