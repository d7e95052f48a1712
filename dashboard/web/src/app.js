// The dashboard's single page: #/runs, #/run/<id>, #/compare?run=..., #/studies, #/study/<name>,
// #/models, #/data. Actions (cancel, retry, pause, promote...) sit where their objects are shown.
// Every user-provided string is rendered as text (dom.js builds nodes; no innerHTML).
import { act, actionButton, confirmPanel, outcomeBox, tryPanel } from "./actions.js";
import { LiveRuns, every, getJSON, getText, onLiveState } from "./api.js";
import { Chart, MetricCurves, colour, phaseColour, positive, smooth } from "./charts.js";
import { badge, chips, clear, fmtAgo, fmtBytes, fmtNumber, fmtTime, h, put, table } from "./dom.js";
import { compareHref, runHref } from "./routes.js";
import { studiesPage, studyPage } from "./studies.js";

const main = document.getElementById("main");
let leave = null;

// a page opened with ?token=... got its cookie: keep the token out of the address bar and history
if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", location.pathname + location.hash);
}

onLiveState((state) => {
  const el = document.getElementById("live-state");
  el.textContent = { live: "● live", reconnecting: "reconnecting…", idle: "" }[state] ?? "";
  el.className = `state ${state}`;
});

getJSON("/api/status").then((status) => {
  document.getElementById("project").textContent = `project ${status.project}`;
  document.title = `TensorDB · ${status.project}`;
}).catch(() => {});

function route() {
  if (leave) {
    try { leave(); } catch (error) { console.error(error); }
    leave = null;
  }
  clear(main);
  const [path, query] = (location.hash.slice(1) || "/runs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] || "runs";
  for (const link of document.querySelectorAll("nav a")) {
    const parent = { run: "runs", study: "studies" }[page];
    link.classList.toggle("active", link.dataset.route === page || link.dataset.route === parent);
  }
  const pages = { runs: runsPage, run: runPage, compare: comparePage, models: modelsPage, data: dataPage, studies: studiesPage, study: studyPage };
  const render = pages[page] || runsPage;
  leave = render(params, parts.slice(1).map(decodeURIComponent).join("/"));
}
window.addEventListener("hashchange", route);
route();

// -- helpers ----------------------------------------------------------------------------------------

function statusBadge(job) {
  return job ? badge(job.status || "?", job.status) : badge("no job", "none");
}

function progressText(job) {
  if (!job) return "";
  const progress = job.progress || {};
  const parts = [];
  if (progress.epoch !== undefined && progress.epoch !== null) parts.push(`epoch ${progress.epoch + 1}${job.epochs ? `/${job.epochs}` : ""}`);
  for (const [key, value] of Object.entries(progress)) {
    if (key === "epoch" || key === "metrics" || key === "cohort_as_of") continue;
    parts.push(`${key} ${typeof value === "number" ? fmtNumber(value) : JSON.stringify(value)}`);
  }
  const metrics = progress.metrics || {};
  for (const [key, value] of Object.entries(metrics).slice(0, 3)) parts.push(`${key} ${fmtNumber(value)}`);
  return parts.join(" · ");
}

/** Cancel (pending, running) or Retry (failed, cancelled) for a job; outcomes in `box`, then `after()`. */
function jobActions(job, box, after) {
  if (!job) return null;
  const id = job.job_id;
  if (job.status === "pending" || job.status === "running") {
    if (job.cancel_requested) return h("span", { class: "small muted" }, "cancel requested");
    return actionButton("Cancel", () => act(box, "/api/jobs/cancel", { job_id: id },
      (a) => (a.job.status === "cancelled" ? `job ${id} cancelled` : `job ${id}: cancel requested (its worker stops at the next step)`), after),
    { class: "job-cancel", dataset: { job: id } });
  }
  if (job.status === "failed" || job.status === "cancelled") {
    return actionButton("Retry", () => act(box, "/api/jobs/retry", { job_id: id },
      () => `job ${id} is pending again (same id, fresh attempts; a train job resumes after its last saved epoch)`, after),
    { class: "job-retry", dataset: { job: id } });
  }
  return null;
}

function lastMetrics(run) {
  const phases = run.phases || {};
  const phase = phases.train || Object.values(phases)[0];
  if (!phase) return [];
  return Object.entries(phase.last_metrics || {}).slice(0, 4).map(([key, value]) => h("span", { class: "chip" }, `${key} ${fmtNumber(value)}`));
}

function lastStep(run) {
  const steps = Object.values(run.phases || {}).map((p) => p.last_step);
  return steps.length ? Math.max(...steps) : null;
}

// -- runs and jobs ---------------------------------------------------------------------------------

function runsPage(params) {
  const selected = new Set(params.getAll("run"));
  const filter = h("input", { type: "search", placeholder: "filter: run, job, policy, worker, tag…", value: params.get("q") || "", class: "grow" });
  const statuses = ["all", "running", "pending", "finished", "failed", "cancelled", "no job"];
  const status = h("select", {}, statuses.map((s) => h("option", { value: s }, s)));
  const compare = h("button", { onclick: () => { location.hash = compareHref([...selected]); } }, "Compare selected");
  const summary = h("span", { class: "muted" });
  const errors = h("div");
  const body = h("div");
  const outcome = outcomeBox();
  put(main, h("section", {}, h("div", { class: "toolbar" }, filter, status, compare, summary), outcome, errors, body));
  let runs = [];
  let now = Date.now() / 1000;
  let refresh = () => {};

  const matches = (run) => {
    const job = run.job || {};
    if (status.value !== "all" && (status.value === "no job" ? run.job : job.status !== status.value)) return false;
    const needle = filter.value.trim().toLowerCase();
    if (!needle) return true;
    const haystack = [run.run_id, job.name, job.kind, job.policy, job.worker, job.status, JSON.stringify(run.tags || {})].join(" ").toLowerCase();
    return haystack.includes(needle);
  };

  const render = () => {
    const shown = runs.filter(matches);
    summary.textContent = `${shown.length} of ${runs.length} runs · ${selected.size} selected`;
    compare.disabled = selected.size === 0;
    const rows = shown.map((run) => {
      const job = run.job;
      const box = h("input", {
        type: "checkbox", checked: selected.has(run.run_id), "aria-label": "select for comparison",
        onchange: (event) => { if (event.target.checked) selected.add(run.run_id); else selected.delete(run.run_id); render(); },
      });
      return h("tr", { dataset: { run: run.run_id } },
        h("td", {}, box),
        h("td", { class: "run" }, h("a", { href: runHref(run.run_id), class: "run-link" }, run.run_id)),
        h("td", {}, statusBadge(job)),
        h("td", {}, job ? `${job.kind || ""} · ${job.name || ""}` : ""),
        h("td", {}, job?.policy || ""),
        h("td", { class: "small" }, job?.worker || ""),
        h("td", { class: "num" }, job ? `${job.attempts ?? 0}/${job.max_attempts ?? "?"}` : ""),
        h("td", { class: "small" }, progressText(job)),
        h("td", { class: "num" }, fmtNumber(run.points)),
        h("td", { class: "num" }, fmtNumber(lastStep(run))),
        h("td", {}, lastMetrics(run)),
        h("td", {}, chips(run.tags)),
        h("td", { class: "small" }, fmtAgo(run.updated_at, now)),
        h("td", {}, jobActions(job, outcome, () => refresh())));
    });
    clear(body, table(
      ["", "run", "status", "job", "policy", "worker", "attempts", "progress", "points", "last step", "last values", "tags", "updated", ""],
      rows, { class: "runs" }));
  };
  filter.addEventListener("input", render);
  status.addEventListener("change", render);
  const load = async () => {
    const data = await getJSON("/api/runs");
    runs = data.runs;
    now = data.now;
    render();
  };
  refresh = () => load().catch(() => {});
  return every(2000, load, errors);
}

// -- one run, live -----------------------------------------------------------------------------------

function runPage(params, runId) {
  const title = h("h1", { class: "run-title" }, runId);
  const jobBox = h("div", { class: "job" });
  const outcome = outcomeBox();
  const note = h("div", { class: "muted note" });
  const errors = h("div");
  const grid = h("div", { class: "charts" });
  put(main, h("section", {},
    h("div", { class: "toolbar" }, h("a", { href: "#/runs" }, "← runs"), h("a", { href: compareHref([runId]) }, "compare…")),
    title, jobBox, outcome, errors, note, grid));

  const charts = new Map();  // metric -> {curves, chart, element}
  let history = null;        // the last /api/run answer (null while loading)
  let pending = [];          // live points received before the history arrived
  let added = {};            // per phase, steps added live since the history
  let generation = 0;
  let zoom = null;
  let fullPoints = 20000;
  const latency = new URLSearchParams(location.hash.split("?")[1] || "").has("latency");
  if (latency && !window.tensordbLatency) window.tensordbLatency = [];

  const chartFor = (metric) => {
    let entry = charts.get(metric);
    if (entry) return entry;
    const element = h("div", { class: "chart", dataset: { metric, points: "0" } });
    const card = h("div", { class: "card chart-card" }, h("h3", {}, metric), element);
    const cards = [...grid.children];
    const after = cards.find((c) => c.dataset.metric > metric);
    card.dataset.metric = metric;
    grid.insertBefore(card, after || null);
    entry = { curves: new MetricCurves(), chart: null, element, card, phases: "" };
    charts.set(metric, entry);
    return entry;
  };

  const draw = (entry) => {
    const phases = entry.curves.phases();
    if (entry.phases !== phases.join(",")) {  // a new phase: a new plot with one more series
      if (entry.chart) entry.chart.destroy();
      entry.chart = new Chart(entry.element, `run:${entry.element.dataset.metric}`,
        phases.map((p, i) => ({ label: p, stroke: phaseColour(p, i) })),
        { xLabel: "step", onZoom: zoomTo, onReset: unzoom });
      entry.phases = phases.join(",");
    }
    if (!zoom) entry.chart.set(entry.curves.data());
  };

  const showNote = () => {
    if (!history) return;
    const phases = { ...Object.fromEntries(Object.keys(added).map((p) => [p, { count: 0, full: true, exact: true }])), ...history.phases };
    const parts = Object.entries(phases).map(([phase, info]) =>
      `${phase}: ${fmtNumber(info.count + (added[phase] || 0))} points${info.full ? "" : info.exact ? " (min/max overview; drag to zoom in at full resolution)" : " (sampled overview, exact one on its way)"}`);
    note.textContent = `${parts.join(" · ")}${zoom ? ` · zoomed to steps ${zoom.lo}–${zoom.hi} (double-click to zoom out)` : ""}`;
  };

  const renderJob = (job) => {
    clear(jobBox);
    if (!job) {
      put(jobBox, h("span", { class: "muted" }, "no job document for this run (logged from a script)"));
      return;
    }
    put(jobBox, 
      statusBadge(job), " ",
      h("span", {}, `${job.kind || ""} · ${job.name || ""}`),
      job.policy ? h("span", {}, ` · policy ${job.policy}`) : null,
      h("span", {}, ` · attempts ${job.attempts ?? 0}/${job.max_attempts ?? "?"}`),
      job.worker ? h("span", {}, ` · worker ${job.worker}`) : null,
      h("span", {}, ` · ${progressText(job)}`),
      job.checkpoint ? h("span", {}, ` · checkpoint epoch ${job.checkpoint.epoch} (v${job.checkpoint.model_version})`) : null,
      " ", jobActions(job, outcome, () => getJSON("/api/job", { id: runId }).then(renderJob).catch(() => {})),
      h("div", { class: "small muted" }, `submitted ${fmtTime(job.submitted_at)} · started ${fmtTime(job.started_at)} · finished ${fmtTime(job.finished_at)}`),
      job.error ? h("pre", { class: "error" }, job.error) : null,
    );
  };

  const apply = (points) => {
    const touched = new Map();  // chart entry -> [step, wall time] of the points it gained (for latency)
    for (const [phase, step, wall, metrics] of points) {
      const known = history.phases[phase];
      if (known && !known.full && known.last_step !== null && step <= known.last_step) continue;  // inside the overview
      let first = true;
      for (const [name, value] of Object.entries(metrics)) {
        const entry = chartFor(name);
        if (entry.curves.add(phase, step, value)) {
          if (!touched.has(entry)) touched.set(entry, []);
          if (first) {
            touched.get(entry).push([step, wall]);
            added[phase] = (added[phase] || 0) + 1;
          }
        }
        first = false;
      }
    }
    let tooLong = false;
    for (const [entry, added] of touched) {
      draw(entry);
      for (const [step, wall] of added) entry.chart.noteLive(step, wall);
      if (entry.curves.x.length > 2 * fullPoints) tooLong = true;
    }
    if (touched.size) showNote();
    if (tooLong) live.restart();  // switch to the overview (a fresh subscription, so nothing is missed)
  };

  // a new subscription: what the page had is superseded by its replay, the history and what follows
  const restart = () => {
    generation += 1;
    history = null;
    pending = [];
    added = {};
  };

  async function loadHistory() {
    const mine = generation;
    const data = await getJSON("/api/run", { id: runId });
    if (mine !== generation) return;
    fullPoints = data.full_points;
    for (const [metric, aligned] of Object.entries(data.charts)) {
      const entry = chartFor(metric);
      entry.curves = MetricCurves.from(aligned);
    }
    for (const [metric, entry] of charts) if (!(metric in data.charts)) entry.curves = new MetricCurves();
    history = data;
    renderJob(data.job);
    const queued = pending;
    pending = [];
    for (const entry of charts.values()) draw(entry);
    for (const points of queued) apply(points);
    showNote();
  }

  async function zoomTo(lo, hi) {
    lo = Math.max(0, Math.floor(lo));
    hi = Math.ceil(hi);
    const data = await getJSON("/api/run", { id: runId, lo, hi });
    zoom = { lo, hi };
    for (const [metric, entry] of charts) {
      const aligned = data.charts[metric];
      if (!entry.chart) continue;
      const phases = entry.curves.phases();
      entry.chart.set([aligned ? aligned.x : [], ...phases.map((p) => (aligned && aligned.y[p]) || (aligned ? aligned.x.map(() => null) : []))]);
    }
    showNote();
  }

  function unzoom() {
    if (!zoom) return;
    zoom = null;
    for (const entry of charts.values()) draw(entry);
    showNote();
  }

  const live = new LiveRuns([runId], {
    onOpen: restart,
    onReady: () => loadHistory().catch((error) => clear(errors, h("div", { class: "error" }, String(error.message || error)))),
    onPoints: (items) => {
      for (const item of items) {
        if (item.run !== runId) continue;
        if (history === null) pending.push(item.points);
        else apply(item.points);
      }
    },
  });
  const stopJob = every(2000, async () => {
    if (history) renderJob(await getJSON("/api/job", { id: runId }));
  });
  return () => {
    live.close();
    stopJob();
    for (const entry of charts.values()) if (entry.chart) entry.chart.destroy();
  };
}

// -- comparison ----------------------------------------------------------------------------------------

function comparePage(params) {
  const state = {
    runs: params.getAll("run"),
    metric: params.get("metric") || "",
    phase: params.get("phase") || "train",
    x: params.get("x") || "step",
    smooth: Number(params.get("smooth") || 0),
    log: params.get("log") === "1",
  };
  const errors = h("div");
  const search = h("input", { type: "search", placeholder: "filter runs…" });
  const list = h("div", { class: "run-list" });
  const metric = h("select", { "aria-label": "metric" });
  const phase = h("select", { "aria-label": "phase" }, ["train", "validation", "test"].map((p) => h("option", { value: p, selected: p === state.phase }, p)));
  const axis = h("select", { "aria-label": "x axis" },
    [["step", "by step"], ["time", "by wall time"], ["relative", "by time since start"]].map(([v, t]) => h("option", { value: v, selected: v === state.x }, t)));
  const smoothing = h("input", { type: "range", min: "0", max: "0.99", step: "0.01", value: String(state.smooth), "aria-label": "smoothing" });
  const smoothValue = h("span", { class: "muted" }, state.smooth.toFixed(2));
  const log = h("input", { type: "checkbox", checked: state.log, "aria-label": "log scale" });
  const info = h("div", { class: "muted note" });
  const chartBox = h("div", { class: "chart", dataset: { points: "0" } });
  put(main, h("section", { class: "compare" },
    h("aside", { class: "card" },
      h("div", { class: "toolbar" }, search),
      h("div", { class: "toolbar" },
        h("button", { onclick: () => { for (const r of visibleRuns()) add(r.run_id); update(); } }, "all shown"),
        h("button", { onclick: () => { state.runs = []; update(); } }, "none")),
      list),
    h("div", { class: "card grow" },
      h("div", { class: "toolbar" },
        h("label", {}, "metric ", metric), h("label", {}, "phase ", phase), axis,
        h("label", {}, "smoothing ", smoothing, smoothValue), h("label", {}, log, " log scale")),
      errors, chartBox, info)));

  let runs = [];
  let chart = null;
  let shape = "";
  let raw = null;
  let answer = "";
  let zoom = null;
  let stopped = false;
  let timer = 0;

  const add = (runId) => { if (!state.runs.includes(runId)) state.runs.push(runId); };
  const visibleRuns = () => {
    const needle = search.value.trim().toLowerCase();
    return runs.filter((r) => !needle || [r.run_id, r.job?.name, r.job?.policy, JSON.stringify(r.tags || {})].join(" ").toLowerCase().includes(needle));
  };

  const renderList = () => {
    clear(list, visibleRuns().map((run) => h("label", { class: "run-option" },
      h("input", {
        type: "checkbox", checked: state.runs.includes(run.run_id),
        onchange: (event) => {
          if (event.target.checked) add(run.run_id);
          else state.runs = state.runs.filter((r) => r !== run.run_id);
          update();
        },
      }),
      h("span", {}, run.run_id), run.job ? badge(run.job.status, run.job.status) : null)));
  };

  const renderMetrics = () => {
    const names = new Set();
    for (const run of runs) if (state.runs.includes(run.run_id)) for (const m of run.metrics || []) names.add(m);
    if (state.metric) names.add(state.metric);
    const sorted = [...names].sort();
    if (!state.metric && sorted.length) state.metric = sorted.includes("loss") ? "loss" : sorted[0];
    clear(metric, sorted.map((m) => h("option", { value: m, selected: m === state.metric }, m)));
  };

  const saveHash = () => {
    const hash = compareHref(state.runs, { metric: state.metric, phase: state.phase, x: state.x, smooth: state.smooth || "", log: state.log ? "1" : "" });
    history.replaceState(null, "", hash);
  };

  const draw = () => {
    if (!raw) return;
    const labels = Object.keys(raw.y);
    const key = [labels.join("\u0000"), state.x, state.log].join("|");
    if (key !== shape) {
      if (chart) chart.destroy();
      chart = new Chart(chartBox, "compare", labels.map((label) => ({ label, stroke: colour(state.runs.indexOf(label)) })), {
        time: state.x === "time", log: state.log, height: 420,
        xLabel: { step: "step", time: "wall time", relative: "seconds since start" }[state.x],
        yLabel: state.metric, onZoom: (lo, hi) => { zoom = { lo, hi }; refresh(); }, onReset: () => { zoom = null; refresh(); },
      });
      shape = key;
    }
    const ys = labels.map((label) => {
      const values = smooth(raw.y[label], state.smooth);
      return state.log ? positive(values) : values;
    });
    chart.set([raw.x, ...ys]);
    const detail = raw.raw.length ? `full resolution for ${raw.raw.length} run(s) in this range` : raw.bucket ? "min/max overview" : "every point";
    info.textContent = `${labels.length} runs · ${raw.x.length} x values · ${detail}${raw.exact ? "" : " (sampled; exact soon)"}`
      + `${raw.empty.length ? ` · no ${state.metric} in: ${raw.empty.join(", ")}` : ""}${zoom ? " · zoomed (double-click to zoom out)" : ""}`;
  };

  async function refresh() {
    clearTimeout(timer);
    saveHash();
    try {
      if (!state.runs.length || !state.metric) {
        raw = null;
        answer = "";
        if (chart) { chart.destroy(); chart = null; shape = ""; }
        info.textContent = state.runs.length ? "no metric logged yet" : "select runs on the left";
      } else {
        // fewer points per run as more runs share the chart: the canvas stays quick to redraw
        const points = Math.max(300, Math.min(1000, Math.floor(60000 / state.runs.length)));
        const text = await getText("/api/compare", {
          run: state.runs, metric: state.metric, phase: state.phase, x: state.x, lo: zoom?.lo, hi: zoom?.hi, points,
        });
        if (text !== answer) {  // unchanged (no run is logging): nothing to redraw
          answer = text;
          raw = JSON.parse(text);
          draw();
        }
      }
      clear(errors);
    } catch (error) {
      clear(errors, h("div", { class: "error" }, String(error.message || error)));
    }
    if (!stopped && !zoom) timer = setTimeout(refresh, 3000);  // follows live training unless zoomed
  }

  const update = () => {
    renderList();
    renderMetrics();
    zoom = null;
    refresh();
  };
  search.addEventListener("input", renderList);
  metric.addEventListener("change", () => { state.metric = metric.value; update(); });
  phase.addEventListener("change", () => { state.phase = phase.value; update(); });
  axis.addEventListener("change", () => { state.x = axis.value; update(); });
  log.addEventListener("change", () => { state.log = log.checked; saveHash(); draw(); });
  smoothing.addEventListener("input", () => { state.smooth = Number(smoothing.value); smoothValue.textContent = state.smooth.toFixed(2); saveHash(); draw(); });

  const stopRuns = every(5000, async () => {
    const first = !runs.length;
    runs = (await getJSON("/api/runs")).runs;
    renderList();
    renderMetrics();
    if (first) refresh();
  }, errors);
  return () => {
    stopped = true;
    clearTimeout(timer);
    stopRuns();
    if (chart) chart.destroy();
  };
}

// -- models ------------------------------------------------------------------------------------------------

function modelsPage() {
  const errors = h("div");
  const body = h("div");
  const outcome = outcomeBox();
  const trying = tryPanel();
  put(main, h("section", {}, outcome, errors, trying.element, body));
  let confirming = false;  // a confirmation is open: the cards are not rebuilt under it
  const load = async () => {
    if (confirming) return;
    const [{ models }, data] = await Promise.all([getJSON("/api/models"), getJSON("/api/data")]);
    if (confirming) return;  // opened while the data was on its way: rebuilding now would remove it
    trying.update(models, data.cohorts);
    clear(body);
    if (!models.length) put(body, h("p", { class: "muted" }, "no models or policies yet"));
    for (const model of models) put(body, modelCard(model, page));
  };
  const page = {
    outcome,
    refresh: () => load().catch(() => {}),
    /** show a confirmation in `where`; refreshes wait until it is answered */
    confirm: (where, question, options) => {
      if (confirming) return;
      confirming = true;
      clear(where, confirmPanel(question, { ...options, onClose: () => { confirming = false; clear(where); page.refresh(); } }));
    },
  };
  return every(5000, load, errors);
}

function metricsText(metrics) {
  return Object.entries(metrics || {}).map(([k, v]) => h("span", { class: "chip" }, `${k} ${fmtNumber(v)}`));
}

function decisionRow(d) {
  if (d.by === "person") {
    return h("tr", { class: "by-person", dataset: { decision: d._id } },
      h("td", { class: "small" }, fmtTime(d.at)),
      h("td", {}, badge(d.action === "roll back" ? "rolled back" : "promoted", d.action === "roll back" ? "stopped" : "finished"), " ", badge(`by ${d.who || "a person"}`, "person")),
      h("td", { class: "num" }, `v${d.version}`),
      h("td", { class: "num" }, d.previous_version ? `v${d.previous_version}` : "–"),
      h("td", {}, "a person's decision"),
      h("td", {}, d.given_reason || h("span", { class: "muted" }, "no reason given")));
  }
  return h("tr", { dataset: { decision: d._id } },
    h("td", { class: "small" }, fmtTime(d.at)),
    h("td", {}, d.promoted ? badge("promoted", "finished") : badge("kept", "none")),
    h("td", { class: "num" }, `v${d.candidate?.version} ${fmtNumber(d.candidate?.[d.metric])}`),
    h("td", { class: "num" }, d.production?.version ? `v${d.production.version} ${fmtNumber(d.production?.[d.metric])}` : "–"),
    h("td", {}, `${d.metric} (${d.direction}, margin ${d.margin})`),
    h("td", {}, d.reason));
}

function modelCard(model, page) {
  const policy = model.policy;
  const panel = h("div", { class: "confirm-slot" });
  const promote = (v) => page.confirm(panel, `Promote v${v.version} of ${model.name} to production${model.production ? ` (replacing v${model.production})` : ""}?`, {
    confirmLabel: `Promote v${v.version}`,
    onConfirm: (reason) => act(page.outcome, "/api/models/promote", { model: model.name, version: v.version, reason },
      (a) => `${model.name}: production is v${a.decision.version} (was ${a.decision.previous_version ? `v${a.decision.previous_version}` : "none"})`),
  });
  const rollBack = () => page.confirm(panel, `Roll production of ${model.name} back from v${model.production} to the version it replaced?`, {
    confirmLabel: "Roll back",
    onConfirm: (reason) => act(page.outcome, "/api/models/rollback", { model: model.name, reason },
      (a) => `${model.name}: rolled back to v${a.decision.version} (from v${a.decision.previous_version})`),
  });
  const versions = model.versions.map((v) => h("tr", { class: v.production ? "production" : "", dataset: { version: String(v.version) } },
    h("td", { class: "num" }, `v${v.version}`),
    h("td", {}, v.aliases.map((a) => badge(a, a === "production" ? "production" : "alias"))),
    h("td", { class: "small" }, fmtTime(v.time)),
    h("td", { class: "num" }, v.epoch ?? "–"),
    h("td", {}, v.job_id ? h("a", { href: runHref(v.job_id) }, v.job_id) : ""),
    h("td", {}, metricsText(v.metrics)),
    h("td", {}, v.evaluations.map((e) => h("div", {}, metricsText(e.metrics), h("span", { class: "small muted" }, ` ${e.job_id || ""}`)))),
    h("td", { class: "num" }, fmtBytes(v.nbytes)),
    h("td", {}, v.production ? null : h("button", { class: "promote", onclick: () => promote(v) }, "Promote"))));
  const decisions = model.decisions.map(decisionRow);
  const production = model.aliases.production;
  const aliasHistory = (production?.history || []).map((entry) => h("tr", {},
    h("td", { class: "small" }, fmtTime(entry.time)),
    h("td", { class: "num" }, `v${entry.version}`),
    h("td", { class: "num" }, entry.previous_version ? `v${entry.previous_version}` : "–"),
    h("td", {}, entry.reason?.by === "person" ? `${entry.reason.action} by ${entry.reason.who}: ${entry.reason.reason}`
      : entry.reason?.reason || JSON.stringify(entry.reason || {}))));
  const pause = policy ? actionButton(policy.paused ? "Resume policy" : "Pause policy", () => act(page.outcome,
    `/api/policies/${policy.paused ? "resume" : "pause"}`, { name: policy.name },
    (a) => `policy ${a.policy} ${a.paused ? "paused: no training is triggered until it is resumed" : "resumed"}`, page.refresh),
  { class: policy.paused ? "policy-resume" : "policy-pause" }) : null;
  return h("div", { class: "card model", dataset: { model: model.name } },
    h("h2", {}, model.name, " ", model.production ? badge(`production v${model.production}`, "production") : badge("no production version", "none"),
      model.production && production?.previous_version ? [" ", h("button", { class: "rollback", onclick: rollBack }, "Roll back")] : null),
    policy ? h("div", { class: "small policy-line" },
      `policy: trigger ${JSON.stringify(policy.trigger)} · objective ${policy.objective?.metric} (${policy.objective?.direction}) · margin ${policy.promotion?.margin ?? 0} · `
      + `${policy.epochs} epochs · ${policy.triggers ?? 0} triggers · `, badge(policy.paused ? "paused" : "active", policy.paused ? "stopped" : "active"), " ", pause) : null,
    panel,
    h("h3", {}, `versions (${model.version_count})`),
    table(["version", "aliases", "saved", "epoch", "job", "training metrics", "evaluations", "size", ""], versions),
    h("h3", {}, "decisions"),
    decisions.length ? table(["at", "outcome", "candidate", "production", "rule", "reason"], decisions) : h("p", { class: "muted" }, "none yet"),
    aliasHistory.length ? [h("h3", {}, "production history"), table(["at", "version", "replaced", "reason"], aliasHistory)] : null);
}

// -- data --------------------------------------------------------------------------------------------------

function dataPage() {
  const errors = h("div");
  const rate = h("div", { class: "chart", dataset: { points: "0" } });
  const body = h("div");
  const letters = h("div");
  const outcome = outcomeBox();
  put(main, h("section", {}, outcome, errors,
    h("div", { class: "card" }, h("h2", {}, "samples imported per minute (last hour)"), rate),
    body, letters));
  let chart = null;
  let refresh = () => {};
  const stageRow = (s) => h("tr", { class: `stage${s.paused ? " paused" : ""}`, dataset: { stage: s.name } },
    h("td", {}, s.name), h("td", { class: "num" }, `v${s.version}`),
    h("td", {}, h("code", {}, JSON.stringify(s.input.filter || s.input.predictions || {}))), h("td", {}, s.output.dataset),
    h("td", {}, badge(s.paused ? "paused" : "active", s.paused ? "stopped" : "active")),
    h("td", { class: "num" }, `${fmtNumber(s.counters.processed)} / ${fmtNumber(s.counters.derived)} / ${fmtNumber(s.counters.errors)}`),
    h("td", { class: "num" }, fmtNumber(s.lag)), h("td", { class: "num" }, fmtNumber(s.per_minute)),
    h("td", {}, actionButton(s.paused ? "Resume" : "Pause", () => act(outcome, `/api/stages/${s.paused ? "resume" : "pause"}`, { name: s.name },
      (a) => `stage ${a.stage} ${a.paused ? "paused: new samples wait until it is resumed" : "resumed"}`, () => refresh()),
    { class: s.paused ? "stage-resume" : "stage-pause" })));
  const load = async () => {
    const [data, dead] = await Promise.all([getJSON("/api/data"), getJSON("/api/dead-letters", { limit: 100 })]);
    if (!chart) chart = new Chart(rate, "imports", [{ label: "samples", stroke: "#2563eb" }], { time: true, bars: true, height: 160 });
    chart.set([data.imported.t, data.imported.count]);
    clear(body, 
      h("div", { class: "card" }, h("h2", {}, "datasets (samples by dataset)"),
        data.datasets.length ? table(["dataset", "samples", "per second (last minute)", "first imported", "last imported"],
          data.datasets.map((d) => [d.name, fmtNumber(d.samples), fmtNumber(d.per_second_last_minute, 3), fmtTime(d.first_imported_at), fmtTime(d.last_imported_at)]))
          : h("p", { class: "muted" }, "no samples yet")),
      h("div", { class: "card" }, h("h2", {}, "cohorts"),
        data.cohorts.length ? table(["cohort", "samples", "filter", "sort", "limit", "description"],
          data.cohorts.map((c) => [c.name, c.samples === null ? (c.error ? `error: ${c.error}` : "?") : fmtNumber(c.samples),
            h("code", {}, c.filter_json || ""), JSON.stringify(c.sort || []), c.limit ?? "–", c.description || ""]))
          : h("p", { class: "muted" }, "no saved cohorts")),
      h("div", { class: "card" }, h("h2", {}, "transform stages"),
        data.stages.length ? table(["stage", "version", "input", "output", "state", "processed / derived / errors", "lag", "derived / min", ""], data.stages.map(stageRow))
          : h("p", { class: "muted" }, "no stages: register one with `tensordb stage register SPEC.json`")),
      h("div", { class: "card" }, h("h2", {}, "saved datasets"),
        data.saved_datasets.length ? table(["name", "version", "saved", "arrays", "size", "description"],
          data.saved_datasets.map((d) => [d.name, String(d.version), fmtTime(d.time),
            d.arrays.map((a) => h("span", { class: "chip" }, `${a.key ?? ""}${a.key ? " " : ""}${a.dtype}[${(a.shape || []).join("×")}]`)),
            fmtBytes(d.nbytes), d.description || ""]))
          : h("p", { class: "muted" }, "none")),
      h("div", { class: "card" }, h("h2", {}, "stream processors (per topic partition)"),
        data.progress.length ? table(["topic", "partition", "valid", "invalid", "last offset", "records/s", "updated"],
          data.progress.map((p) => [p.kind, p.partition, fmtNumber(p.valid), fmtNumber(p.invalid), fmtNumber(p.last_offset),
            p.rate === null || p.rate === undefined ? "–" : fmtNumber(p.rate, 3), fmtAgo(p.updated_at)]))
          : h("p", { class: "muted" }, "the processors have not processed anything yet")));
    clear(letters, h("div", { class: "card" }, h("h2", {}, `dead letters (${fmtNumber(dead.total)})`),
      dead.by_reason.length ? table(["topic", "error", "count", "last"], dead.by_reason.map((r) => [r.topic, r.error_type, fmtNumber(r.count), fmtTime(r.last)])) : null,
      dead.letters.length ? table(["at", "topic / partition / offset", "error", "reason", "processor", "original (start)"],
        dead.letters.map((d) => [fmtTime(d.at), `${d.topic} / ${d.partition} / ${d.offset}`, d.error_type, h("span", { class: "reason" }, d.reason),
          d.processor, h("pre", { class: "original" }, `${d.original_preview}${d.original_bytes > 400 ? "…" : ""} (${fmtBytes(d.original_bytes)})`)]))
        : h("p", { class: "muted" }, "none: every record was valid")));
  };
  refresh = () => load().catch(() => {});
  const stop = every(3000, load, errors);
  return () => {
    stop();
    if (chart) chart.destroy();
  };
}
