// smearscope page: uploads fields one at a time to /api/fields and draws what comes back.
// Classes, colours, line widths and CSV columns come from /api/info, the server's single source.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { info: null, fields: [], queue: [], busy: false, done: 0, total: 0 };
const $ = (id) => document.getElementById(id);
const fieldName = (result) => result.field.field;  // the uploaded file's name: a label only

async function start() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  $("disclaimer").textContent = state.info.disclaimer;
  $("threshold-note").textContent = `A cell is called Parasitized from ${state.info.decision_rule}.` +
    " A field or total is positive only when its share of Parasitized cells is clearly above the model's " +
    `false-positive rate, negative only when it is clearly below what a ${state.info.negative_below_pct} % ` +
    "parasitemia would give.";
  $("file-input").addEventListener("change", (event) => { enqueue(event.target.files); event.target.value = ""; });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    enqueue(event.dataTransfer.files);
  });
  $("only-parasitized").addEventListener("change", (event) => {
    $("fields").classList.toggle("only-parasitized", event.target.checked);
  });
  $("download-cells").addEventListener("click", () => download("smearscope-cells.csv",
    csv(state.info.cell_columns, state.fields.flatMap((f) => f.cells)), "text/csv"));
  $("download-fields").addEventListener("click", () => download("smearscope-fields.csv",
    csv(state.info.field_columns, state.fields.map((f) => f.field)), "text/csv"));
  document.body.dataset.ready = "true";
}

function enqueue(files) {
  for (const file of files) state.queue.push(file);
  state.total += files.length;
  if (!state.busy) drain();
}

async function drain() {
  state.busy = true;
  $("progress-area").hidden = false;
  while (state.queue.length) {
    const file = state.queue.shift();
    showProgress(`Analysing ${file.name} (${state.done + 1} of ${state.total})…`);
    try {
      addField(await analyse(file));
    } catch (error) {
      const item = document.createElement("li");
      item.textContent = `${file.name}: ${error.message}`;
      $("errors").append(item);
    }
    state.done += 1;
  }
  showProgress(`${state.done} of ${state.total} done.`);
  state.busy = false;
}

function showProgress(text) {
  $("progress").max = Math.max(state.total, 1);
  $("progress").value = state.done;
  $("progress-text").textContent = text;
}

async function analyse(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch("/api/fields?image=true", { method: "POST", body: form });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function addField(field) {
  field.index = state.fields.length;
  state.fields.push(field);
  $("summary").hidden = false;
  const row = document.createElement("tr");
  row.dataset.field = field.index;
  const link = document.createElement("a");
  link.href = `#field-${field.index}`;
  link.textContent = fieldName(field);
  const nameCell = document.createElement("td");
  nameCell.append(link);
  const counts = field.counts;
  row.append(nameCell, ...[counts.cells, counts.parasitized, counts.parasitemia_pct.toFixed(2), interval(counts),
    counts.call].map((value) => Object.assign(document.createElement("td"), { textContent: value })));
  $("summary-rows").append(row);
  $("fields").append(fieldView(field));
  showTotal();
}

function interval(counts) {
  return `${counts.ci_low_pct.toFixed(2)}–${counts.ci_high_pct.toFixed(2)}`;
}

// The total's interval and call come from the server, which calls slides as the batch job does.
async function showTotal() {
  const cells = state.fields.reduce((sum, f) => sum + f.counts.cells, 0);
  const parasitized = state.fields.reduce((sum, f) => sum + f.counts.parasitized, 0);
  const response = await fetch(`/api/call?parasitized=${parasitized}&cells=${cells}`);
  if (!response.ok) return;
  const total = await response.json();
  if (total.cells !== state.fields.reduce((sum, f) => sum + f.counts.cells, 0)) return;  // a newer field came in
  $("total-cells").textContent = total.cells;
  $("total-parasitized").textContent = total.parasitized;
  $("total-parasitemia").textContent = total.parasitemia_pct.toFixed(2);
  $("total-interval").textContent = interval(total);
  $("total-call").textContent = total.call;
}

function fieldView(field) {
  const view = $("field-template").content.firstElementChild.cloneNode(true);
  view.id = `field-${field.index}`;
  view.querySelector(".field-title").textContent = fieldName(field);
  view.querySelector(".field-counts").textContent =
    `${field.counts.cells} cells, ${field.counts.parasitized} parasitized, ` +
    `parasitemia ${field.counts.parasitemia_pct.toFixed(2)} % (95 % CI ${interval(field.counts)}), ` +
    `call: ${field.counts.call}`;
  const { width, height } = field.field;
  const svg = view.querySelector("svg");
  svg.setAttribute("aria-label", `${fieldName(field)}: ${field.counts.cells} cells outlined`);
  const image = document.createElementNS(SVG, "image");
  image.setAttribute("href", field.image);
  image.setAttribute("width", width);
  image.setAttribute("height", height);
  svg.append(image);
  const readout = view.querySelector(".cell-readout");
  for (const cell of field.cells) svg.append(cellBox(cell, readout));
  const camera = panZoom(view.querySelector(".viewer"), svg, width, height);
  view.querySelector(".zoom-in").addEventListener("click", () => camera.zoom(1.5));
  view.querySelector(".zoom-out").addEventListener("click", () => camera.zoom(1 / 1.5));
  view.querySelector(".zoom-reset").addEventListener("click", () => camera.reset());
  view.querySelector(".download-overlay").addEventListener("click", () => downloadOverlay(field));
  return view;
}

function describeCell(cell) {
  return `Cell ${cell.cell_id}: ${cell.label}, p(parasitized) = ${cell.p_parasitized.toFixed(3)}, ` +
    `box ${cell.x},${cell.y} ${cell.w}×${cell.h} px`;
}

function cellBox(cell, readout) {
  const rect = document.createElementNS(SVG, "rect");
  for (const [name, value] of Object.entries({ x: cell.x, y: cell.y, width: cell.w, height: cell.h })) {
    rect.setAttribute(name, value);
  }
  rect.setAttribute("stroke", state.info.colours[cell.label]);
  rect.setAttribute("stroke-width", state.info.line_widths[cell.label]);
  rect.setAttribute("tabindex", "0");
  rect.setAttribute("role", "button");
  rect.setAttribute("aria-label", describeCell(cell));
  rect.classList.add(cell.label);
  rect.dataset.cellId = cell.cell_id;
  const title = document.createElementNS(SVG, "title");
  title.textContent = describeCell(cell);
  rect.append(title);
  const show = () => {
    readout.textContent = describeCell(cell);
    rect.closest("svg").querySelectorAll("rect.selected").forEach((r) => r.classList.remove("selected"));
    rect.classList.add("selected");
  };
  for (const type of ["mouseenter", "focus", "click"]) rect.addEventListener(type, show);
  return rect;
}

// Zoom with the wheel, the buttons or + and −; pan by dragging or with the arrow keys.
function panZoom(viewer, svg, width, height) {
  let scale = 1, x = 0, y = 0, drag = null;
  const apply = () => {
    const w = width / scale, h = height / scale;
    x = Math.min(Math.max(x, 0), width - w);
    y = Math.min(Math.max(y, 0), height - h);
    svg.setAttribute("viewBox", `${x} ${y} ${w} ${h}`);
  };
  const zoom = (factor, fx = 0.5, fy = 0.5) => {
    const next = Math.min(Math.max(scale * factor, 1), 16);
    const w = width / scale, h = height / scale;
    x += fx * w * (1 - scale / next);
    y += fy * h * (1 - scale / next);
    scale = next;
    apply();
  };
  viewer.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = svg.getBoundingClientRect();
    zoom(event.deltaY < 0 ? 1.25 : 0.8, (event.clientX - box.left) / box.width, (event.clientY - box.top) / box.height);
  }, { passive: false });
  viewer.addEventListener("pointerdown", (event) => {
    drag = { px: event.clientX, py: event.clientY, x, y, moved: false };
  });
  viewer.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.px, dy = event.clientY - drag.py;
    if (!drag.moved && Math.hypot(dx, dy) < 4) return;
    if (!drag.moved) { viewer.setPointerCapture(event.pointerId); viewer.classList.add("panning"); }
    drag.moved = true;
    const perPixel = width / scale / svg.getBoundingClientRect().width;
    x = drag.x - dx * perPixel;
    y = drag.y - dy * perPixel;
    apply();
  });
  const stop = () => { drag = null; viewer.classList.remove("panning"); };
  viewer.addEventListener("pointerup", stop);
  viewer.addEventListener("pointercancel", stop);
  viewer.addEventListener("keydown", (event) => {
    const step = width / scale / 10;
    const keys = {
      "+": () => zoom(1.5), "=": () => zoom(1.5), "-": () => zoom(1 / 1.5), "0": () => { scale = 1; apply(); },
      ArrowLeft: () => { x -= step; apply(); }, ArrowRight: () => { x += step; apply(); },
      ArrowUp: () => { y -= step; apply(); }, ArrowDown: () => { y += step; apply(); },
    };
    if (event.target === viewer && keys[event.key]) { event.preventDefault(); keys[event.key](); }
  });
  apply();
  return { zoom, reset: () => { scale = 1; apply(); } };
}

// The overlay as the batch job draws it: each box in its class colour and line width, inside the box.
function downloadOverlay(field) {
  const image = new Image();
  image.onload = () => {
    const canvas = Object.assign(document.createElement("canvas"), { width: field.field.width, height: field.field.height });
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    for (const cell of field.cells) {
      const line = state.info.line_widths[cell.label];
      context.strokeStyle = state.info.colours[cell.label];
      context.lineWidth = line;
      context.strokeRect(cell.x + line / 2, cell.y + line / 2, cell.w - line, cell.h - line);
    }
    canvas.toBlob((blob) => saveBlob(`${stem(fieldName(field))}-overlay.png`, blob), "image/png");
  };
  image.src = field.image;
}

function stem(name) {
  return name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "_") || "field";
}

function csv(columns, rows) {
  const quote = (value) => {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  return [columns.join(","), ...rows.map((row) => columns.map((c) => quote(row[c])).join(","))].join("\n") + "\n";
}

function download(name, text, type) {
  saveBlob(name, new Blob([text], { type }));
}

function saveBlob(name, blob) {
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

start();
