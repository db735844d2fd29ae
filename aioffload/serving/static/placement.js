// The placement map: one cell per decoder layer (plus embeddings and lm_head), coloured by
// where its weights live; a split layer shows its host share, an MoE layer its experts.

export function formatBytes(n) {
  for (const [unit, scale] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (n >= scale) return `${(n / scale).toFixed(unit === "GB" ? 2 : 1)} ${unit}`;
  }
  return `${n} B`;
}

function cell(kind, label, info, detail) {
  const div = document.createElement("div");
  div.className = `cell place-${info.place}`;
  div.dataset.kind = kind;
  div.dataset.place = info.place;
  const name = document.createElement("span");
  name.className = "cell-name";
  name.textContent = label;
  div.append(name);
  let title = `${label}: ${placeName(info.place)}, ${detail}`;
  if (info.place === "split" && typeof info.host_share === "number") {
    const pct = Math.round(info.host_share * 100);
    const bar = document.createElement("span");
    bar.className = "share";
    bar.style.width = `${pct}%`;
    div.append(bar);
    div.dataset.hostShare = String(info.host_share);
    title += `; host computes ${pct}%`;
  }
  if (info.experts) {
    const e = info.experts;
    const pips = document.createElement("span");
    pips.className = "experts";
    pips.textContent = `${e.gpu}/${e.count}`;
    div.append(pips);
    title += `; experts: ${e.gpu} of ${e.count} on the GPU, ${e.host} on the host` +
      (e.bytes_each ? ` (${formatBytes(e.bytes_each)} each)` : "");
  }
  div.title = title;
  return div;
}

function placeName(place) {
  return { gpu: "resident", host: "streamed from host", split: "split host / GPU" }[place] || place;
}

function layerDetail(layer) {
  const parts = [formatBytes(layer.bytes)];
  if (layer.gpu_bytes && layer.host_bytes) {
    parts.push(`${formatBytes(layer.gpu_bytes)} GPU + ${formatBytes(layer.host_bytes)} host`);
  }
  return parts.join(", ");
}

function term(dl, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dl.append(dt, dd);
}

export function renderPlacement(p) {
  document.getElementById("placement-device").textContent =
    `${p.device}, ${p.dtype}${p.cuda_graphs ? ", CUDA graphs" : ""}`;
  const cells = document.getElementById("cells");
  cells.replaceChildren();
  cells.append(cell("embed", "embed", p.embed, formatBytes(p.embed.bytes)));
  for (const layer of p.layers) {
    const c = cell("layer", String(layer.index), layer, layerDetail(layer));
    c.dataset.index = String(layer.index);
    c.title = `layer ${c.title}`;
    cells.append(c);
  }
  const head = p.lm_head.tied ? "tied to the embedding" : formatBytes(p.lm_head.bytes);
  cells.append(cell("lm_head", "lm_head", p.lm_head, head));

  const counts = { gpu: 0, host: 0, split: 0 };
  for (const layer of p.layers) counts[layer.place] = (counts[layer.place] || 0) + 1;
  const t = p.totals;
  const dl = document.getElementById("placement-totals");
  dl.replaceChildren();
  term(dl, "resident weights", `${formatBytes(t.gpu_weight_bytes)} (${counts.gpu} of ${p.num_layers} layers)`);
  const hostLayers = counts.host + counts.split;
  const split = counts.split ? `, ${counts.split} split` : "";
  term(dl, "host weights", `${formatBytes(t.host_weight_bytes)} (${hostLayers} layer${hostLayers === 1 ? "" : "s"}${split})`);
  if (t.ring_bytes) term(dl, "prefetch ring", formatBytes(t.ring_bytes));
  const kv = p.kv;
  term(dl, "KV cache", `${kv.blocks} blocks x ${kv.block_size} = ${kv.tokens.toLocaleString("en-US")} tokens (${formatBytes(kv.bytes)})`);
  if (p.copy.bytes_per_step) {
    term(dl, "copy floor", `${p.copy.floor_ms.toFixed(1)} ms per step (${formatBytes(p.copy.bytes_per_step)} at ${(p.copy.h2d_bytes_per_s / 1e9).toFixed(1)} GB/s)`);
  } else {
    term(dl, "copy floor", "none: every layer resident");
  }
  document.getElementById("placement-reason").textContent = p.reason;
}
