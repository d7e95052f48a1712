// The dashboard's API: JSON reads, actions (POST) and the live stream (Server-Sent Events).
// The token, when the dashboard has one, travels as a cookie the server set when the page was
// opened with ?token=...: nothing here handles it. Actions carry the CSRF token the server binds to
// that cookie (GET /api/csrf), in the X-CSRF-Token header, and send their Origin.
import { clear, h } from "./dom.js";

/** the body of a JSON answer as text (to compare with the previous one before parsing it) */
export async function getText(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) query.append(key, item);
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const text = await response.text();
  if (!response.ok) throw new Error(`${response.status} ${text.slice(0, 300)}`);
  return text;
}

export async function getJSON(path, params = {}) {
  return JSON.parse(await getText(path, params));
}

let csrf = null;

async function csrfToken(fresh) {
  if (csrf === null || fresh) csrf = JSON.parse(await getText("/api/csrf")).csrf_token;
  return csrf;
}

/** an error answer as one line: FastAPI's validation errors (a list) as "field: message; ..." */
function errorText(status, data, text) {
  const detail = data?.detail;
  if (Array.isArray(detail)) {
    return `${status} ${detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ")}`;
  }
  return `${status} ${typeof detail === "string" ? detail : text.slice(0, 300)}`;
}

/** POST `body` as JSON (an action): the answer's JSON, or an Error saying why it was refused */
export async function postJSON(path, body) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, {
      method: "POST",
      referrerPolicy: "same-origin",  // the page's policy (no-referrer) would send "Origin: null"
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": await csrfToken(attempt > 0) },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try { data = JSON.parse(text); } catch { data = null; }
    if (response.ok) return data;
    if (response.status === 403 && data?.error === "csrf" && attempt === 0) continue;  // a restarted server: a new token, once
    throw new Error(errorText(response.status, data, text));
  }
}

/** call fn now and every `ms` after it finishes, until the returned function is called (errors shown in errorBox) */
export function every(ms, fn, errorBox) {
  let stopped = false;
  let timer = 0;
  const tick = async () => {
    if (stopped) return;
    try {
      await fn();
      if (errorBox) clear(errorBox);
    } catch (error) {
      if (errorBox && !stopped) clear(errorBox, h("div", { class: "error" }, String(error.message || error)));
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

const listeners = new Set();
export function onLiveState(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}
function announce(state) {
  for (const listener of listeners) listener(state);
}

/**
 * Follows runs live. For every connection (the first and each reconnection): `onOpen()` first,
 * then `onPoints(items)` with the points the server consumed that MongoDB may not have yet, then
 * `onReady()` once the server has registered the subscription: read the history then, and merge
 * it with every point received since `onOpen` (by step). `onPoints(items)` gets
 * [{run, points: [[phase, step, wall_time, metrics], ...]}, ...].
 */
export class LiveRuns {
  constructor(runs, { all = false, onOpen = () => {}, onReady, onPoints }) {
    this.params = new URLSearchParams();
    for (const run of runs) this.params.append("run", run);
    if (all) this.params.set("all", "1");
    this.onOpen = onOpen;
    this.onReady = onReady;
    this.onPoints = onPoints;
    this.closed = false;
    this.open();
  }

  open() {
    this.source = new EventSource(`/api/live?${this.params}`);
    this.source.addEventListener("open", () => this.onOpen());
    this.source.addEventListener("points", (event) => this.onPoints(JSON.parse(event.data)));
    this.source.addEventListener("ready", () => {
      announce("live");
      this.onReady();
    });
    this.source.addEventListener("reset", () => {  // we fell behind: start over
      this.source.close();
      if (!this.closed) setTimeout(() => this.open(), 200);
    });
    this.source.onerror = () => announce(this.closed ? "idle" : "reconnecting");
  }

  /** a fresh subscription (replayed points, then ready) */
  restart() {
    this.source.close();
    if (!this.closed) this.open();
  }

  close() {
    this.closed = true;
    this.source.close();
    announce("idle");
  }
}
