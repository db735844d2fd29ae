// Live charts over the last few minutes of /v1/dashboard snapshots (uPlot, vendored).
// Step charts get one point per engine step; rate charts one point per snapshot. Times are
// the server's clock, so a recorded run replays with its own time axis.

const COLORS = ["#4fc3f7", "#ffb74d", "#e57373", "#81c784", "#ba68c8", "#fff176"];
// Labels of the extra per-step fields features may add (StepStats.extra_fields); others show by name.
const EXTRA_TITLES = {
  host_share: ["host share of the split layers (%)", 100],
};

// Every y axis starts at 0, so a step's distance from the floor (or a rate's from nothing) reads true.
function fromZero(u, min, max) {
  return [0, max > 0 ? max * 1.08 : 1];
}

function pointSeries(label, color, scale = "y") {
  return { label, scale, stroke: color, fill: undefined, width: 0, paths: () => null,
           points: { show: true, size: 4, stroke: color, fill: color } };
}

function lineSeries(label, color, dash) {
  return { label, stroke: color, width: 1.5, dash, points: { show: false } };
}

class Chart {
  // xRange() gives every chart the same time window.
  constructor(grid, id, title, series, xRange) {
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.id = `chart-${id}`;
    this.figure.dataset.points = "0";
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.plotDiv = document.createElement("div");
    this.figure.append(caption, this.plotDiv);
    grid.append(this.figure);
    const axis = { stroke: "#9aa4b1", grid: { stroke: "#2a3038" }, ticks: { stroke: "#2a3038" } };
    const axes = [{ ...axis }, { ...axis, size: 50 }];
    if (series.some((x) => x.scale && x.scale !== "y")) {  // a second y scale: its axis on the right
      const scale = series.find((x) => x.scale && x.scale !== "y").scale;
      axes.push({ ...axis, scale, side: 1, size: 40, grid: { show: false } });
    }
    this.plot = new uPlot({
      width: this.width(), height: 170,
      series: [{}, ...series],
      axes,
      scales: { x: { time: true, range: () => xRange() }, y: { range: fromZero }, right: { range: fromZero } },
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
    }, [[], ...series.map(() => [])], this.plotDiv);
  }

  width() {
    return Math.max(240, this.figure.clientWidth - 4);
  }

  set(data) {
    this.plot.setData(data);
    this.figure.dataset.points = String(data[0].length);
  }

  resize() {
    this.plot.setSize({ width: this.width(), height: 170 });
  }
}

// Columns of equal length, trimmed together from the front.
class Columns {
  constructor(names) {
    this.names = names;
    for (const n of names) this[n] = [];
  }

  push(row) {
    for (const n of this.names) this[n].push(row[n] === undefined ? null : row[n]);
  }

  trimBefore(t0) {
    let i = 0;
    while (i < this.t.length && this.t[i] < t0) i++;
    if (i) for (const n of this.names) this[n].splice(0, i);
  }
}

export class Charts {
  constructor(grid, windowS = 300) {
    this.grid = grid;
    this.windowS = windowS;
    this.charts = null;  // built from the first snapshot (which fields it carries)
    this.last = null;
    window.addEventListener("resize", () => this.charts && Object.values(this.charts).forEach((c) => c.resize()));
  }

  build(snap) {
    this.extras = snap.step_fields.slice(4);
    this.offload = snap.copy_floor_ms > 0;
    this.steps = new Columns(["t", "decode", "mixed", "floor", "tokens", "seqs", ...this.extras]);
    this.polls = new Columns(["t", "toks", "kv", "busy", "accepted", "length"]);
    const stepSeries = [pointSeries("decode steps", COLORS[0]), pointSeries("steps with prefill or proposals", COLORS[1])];
    if (this.offload) stepSeries.push(lineSeries("copy floor", COLORS[2], [6, 4]));
    const chart = (id, title, series) => new Chart(this.grid, id, title, series, () => this.xRange());
    const c = {
      step: chart("step", "step time (ms) against the copy floor", stepSeries),
      batch: chart("batch", "tokens (left) and sequences (right) per step",
                   [pointSeries("tokens", COLORS[3]), pointSeries("sequences", COLORS[4], "right")]),
      toks: chart("toks", "output tokens/s", [lineSeries("output tok/s", COLORS[0])]),
      kv: chart("kv", "KV cache usage (%)", [lineSeries("KV usage %", COLORS[3])]),
      busy: chart("busy", this.offload ? "copy stream busy (% of wall time)" : "copy stream busy (%): nothing is streamed",
                  [lineSeries("busy %", COLORS[2])]),
    };
    for (const [i, name] of this.extras.entries()) {
      const [title] = EXTRA_TITLES[name] || [name];
      c[`extra-${name}`] = chart(name, title, [pointSeries(name, COLORS[(i + 5) % COLORS.length])]);
    }
    this.charts = c;
  }

  // Take one /v1/dashboard snapshot: its new steps, and the rates since the previous one.
  add(snap) {
    if (!this.charts) this.build(snap);
    const col = Object.fromEntries(snap.step_fields.map((name, i) => [name, i]));
    const floor = this.offload ? snap.copy_floor_ms : null;
    let busyMs = 0;
    for (const row of snap.steps) {
      const ms = row[col.step_ms];
      const decode = row[col.tokens] === row[col.seqs];
      const entry = { t: row[col.t], decode: decode ? ms : null, mixed: decode ? null : ms, floor,
                      tokens: row[col.tokens], seqs: row[col.seqs] };
      for (const name of this.extras) {
        const [, scale] = EXTRA_TITLES[name] || [name, 1];
        entry[name] = row[col[name]] === null ? null : row[col[name]] * scale;
      }
      this.steps.push(entry);
      // A split step streams only the GPU's share of each offloaded layer.
      const streamed = col.host_share === undefined ? 1 : 1 - row[col.host_share];
      if (floor) busyMs += Math.min(ms, floor * streamed);
    }
    const prev = this.last;
    if (prev && snap.time > prev.time) {
      const dt = snap.time - prev.time;
      const delta = (key) => snap[key] - prev[key];
      const row = { t: snap.time, toks: delta("generation_tokens_total") / dt, kv: snap.kv_usage * 100,
                    busy: Math.min(100, busyMs / (dt * 10)), accepted: null, length: null };
      // Speculative decoding, where the engine counts it: proposals accepted, tokens per verifying step.
      if (snap.spec_proposed_tokens_total !== undefined && delta("spec_proposed_tokens_total") > 0) {
        row.accepted = 100 * delta("spec_accepted_tokens_total") / delta("spec_proposed_tokens_total");
        row.length = delta("spec_emitted_tokens_total") / Math.max(1, delta("spec_verifications_total"));
        if (!this.charts.spec) {
          this.charts.spec = new Chart(this.grid, "spec", "speculative decoding: accepted (%, left), tokens per verifying step (right)",
            [lineSeries("accepted %", COLORS[5]), { ...lineSeries("tokens per step", COLORS[4]), scale: "right" }],
            () => this.xRange());
        }
      }
      this.polls.push(row);
    }
    if (!prev || snap.time > prev.time) this.last = snap;
    this.steps.trimBefore(snap.time - this.windowS);
    this.polls.trimBefore(snap.time - this.windowS);
  }

  // From the oldest point kept to the newest snapshot, at most the window wide.
  xRange() {
    const now = this.last ? this.last.time : Date.now() / 1e3;
    const first = Math.min(this.steps.t.length ? this.steps.t[0] : now, this.polls.t.length ? this.polls.t[0] : now);
    return [Math.min(first, now - 10), now];
  }

  draw() {
    if (!this.charts) return;
    const s = this.steps;
    const p = this.polls;
    const c = this.charts;
    c.step.set(this.offload ? [s.t, s.decode, s.mixed, s.floor] : [s.t, s.decode, s.mixed]);
    c.batch.set([s.t, s.tokens, s.seqs]);
    c.toks.set([p.t, p.toks]);
    c.kv.set([p.t, p.kv]);
    c.busy.set([p.t, p.busy]);
    if (c.spec) c.spec.set([p.t, p.accepted, p.length]);
    for (const name of this.extras) c[`extra-${name}`].set([s.t, s[name]]);
  }
}
