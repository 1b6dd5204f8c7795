// ragcap's page: choose or drop images, caption each with the chosen modes, show captions,
// neighbours, timing and errors. Plain DOM, no build step. Every text from the server or a file
// name goes in through textContent, never as HTML.
"use strict";

const PARALLEL = 4; // one request per image, a few at a time: the server batches them together

const $ = (id) => document.getElementById(id);
let files = [];
let thumbnails = [];
let infoLoaded = Promise.resolve();

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text) {
  $("status").textContent = text;
}

async function loadInfo() {
  let response;
  try {
    response = await fetch("/v1/info", { headers: apiHeaders() });
  } catch (err) {
    setStatus(`The server cannot be reached: ${err.message}`);
    return;
  }
  if (response.status === 401) {
    $("key-field").hidden = false;
    setStatus("This server needs an API key: enter it below.");
    return;
  }
  const info = await response.json();
  if (!response.ok) {
    setStatus(info.error ? info.error.message : `The server answered ${response.status}.`);
    return;
  }
  $("key-field").hidden = !info.api_key_required;
  $("service").textContent = `Collection ${info.collection} · embedder ${info.embedder} · up to ${info.limits.max_images} images per request`;
  $("k").placeholder = `default ${info.k}`;
  $("k").max = info.limits.max_k;
  $("neighbours").max = info.limits.max_neighbours;
  const modes = $("modes");
  modes.querySelectorAll("label").forEach((label) => label.remove());
  for (const mode of info.available_modes) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "mode";
    box.value = mode;
    box.checked = info.modes.includes(mode);
    label.append(box, ` ${mode}`);
    modes.append(label);
  }
  setStatus("");
}

function chosenModes() {
  return [...document.querySelectorAll('input[name="mode"]:checked')].map((box) => box.value);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function makeCard(file, index) {
  const card = element("article", "card");
  const heading = element("h2", "name", file.name);
  heading.id = `image-${index}`;
  card.setAttribute("aria-labelledby", heading.id);
  const img = document.createElement("img");
  const url = URL.createObjectURL(file);
  thumbnails.push(url);
  img.src = url;
  img.alt = file.name;
  img.addEventListener("error", () => { img.hidden = true; });
  const body = element("div", "body");
  body.append(heading, element("p", "pending", "Captioning…"));
  card.append(img, body);
  return card;
}

function showError(card, message) {
  const body = card.querySelector(".body");
  body.querySelector(".pending")?.remove();
  const error = element("p", "error", message);
  error.setAttribute("role", "alert");
  body.append(error);
}

function showResult(card, result, timing) {
  const body = card.querySelector(".body");
  body.querySelector(".pending")?.remove();
  if (result.error) {
    showError(card, result.error.message);
    return;
  }
  const captions = element("dl", "captions");
  for (const c of result.captions) {
    const caption = element("dd", "caption", c.caption);
    caption.dataset.mode = c.mode;
    captions.append(element("dt", "mode", c.mode), caption);
  }
  body.append(captions);
  if (result.neighbours && result.neighbours.length) {
    body.append(element("h3", "", "Retrieved captions"));
    const list = element("ol", "neighbours");
    for (const n of result.neighbours) {
      const item = element("li");
      item.append(element("span", "neighbour", n.caption), " ", element("span", "score", n.score.toFixed(3)));
      list.append(item);
    }
    body.append(list);
  }
  body.append(element("p", "timing",
    `${Math.round(timing.total_ms)} ms (queued ${Math.round(timing.queue_ms)} ms, model ${Math.round(timing.compute_ms)} ms ` +
    `in a batch of ${timing.batch_items})`));
}

async function captionOne(file, card, modes) {
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("modes", modes.join(","));
  if ($("k").value) form.append("k", $("k").value);
  if ($("neighbours").value) form.append("neighbours", $("neighbours").value);
  let response, answer;
  try {
    response = await fetch("/v1/caption", { method: "POST", body: form, headers: apiHeaders() });
    answer = await response.json();
  } catch (err) {
    showError(card, `No answer from the server: ${err.message}`);
    return false;
  }
  if (!response.ok) {
    showError(card, answer.error ? answer.error.message : `The server answered ${response.status}.`);
    if (response.status === 401) $("key-field").hidden = false;
    return false;
  }
  showResult(card, answer.results[0], answer.timing);
  return !answer.results[0].error;
}

async function run() {
  await infoLoaded; // the mode boxes come from /v1/info
  const modes = chosenModes();
  if (!files.length) {
    setStatus("Choose or drop images first.");
    return;
  }
  if (!modes.length) {
    setStatus("Choose at least one mode.");
    return;
  }
  thumbnails.forEach((url) => URL.revokeObjectURL(url));
  thumbnails = [];
  const results = $("results");
  results.replaceChildren();
  const cards = files.map((file, i) => makeCard(file, i));
  results.append(...cards);
  $("run").disabled = true;
  setStatus(`Captioning ${files.length} image${files.length === 1 ? "" : "s"}…`);
  const started = performance.now();
  let next = 0, ok = 0;
  async function worker() {
    while (next < files.length) {
      const i = next++;
      if (await captionOne(files[i], cards[i], modes)) ok++;
    }
  }
  await Promise.all(Array.from({ length: Math.min(PARALLEL, files.length) }, worker));
  const failed = files.length - ok;
  setStatus(`Done in ${Math.round(performance.now() - started)} ms: ${ok} captioned` + (failed ? `, ${failed} failed.` : "."));
  $("run").disabled = false;
}

function choose(list) {
  files = [...list];
  run();
}

document.addEventListener("DOMContentLoaded", () => {
  infoLoaded = loadInfo();
  $("files").addEventListener("change", (event) => choose(event.target.files));
  $("api-key").addEventListener("change", () => { infoLoaded = loadInfo(); });
  $("caption-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) choose(event.dataTransfer.files);
  });
});
