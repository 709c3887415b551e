// The /v1 API as the pages use it. The key lives in sessionStorage only (gone when the tab
// closes) and travels as the bearer header, never in a URL or a cookie. Images and files are
// fetched with the header and shown through blob: URLs for the same reason.

const KEY = "greenmim.apiKey";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

/** A problem+json answer (RFC 9457): status, title, detail, and per-field errors. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export const enc = encodeURIComponent;

export async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  const h = new Headers(headers);
  const key = auth.get();
  if (key) h.set("Authorization", `Bearer ${key}`);
  if (body !== undefined) h.set("Content-Type", "application/json");
  const resp = await fetch(path, {
    method, headers: h, signal, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    let problem;
    try { problem = await resp.json(); } catch { problem = { title: resp.statusText, detail: "" }; }
    if (resp.status === 401 && key) {
      auth.clear();
      window.dispatchEvent(new CustomEvent("greenmim:signed-out"));
    }
    throw new ApiError(resp.status, problem);
  }
  return raw ? resp : resp.json();
}

/** A blob: URL for an API resource that needs the key (previews). Revoke it when done. */
export async function blobUrl(path, signal) {
  const resp = await api(path, { raw: true, signal });
  return URL.createObjectURL(await resp.blob());
}

export async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

/**
 * The job's metric stream (SSE over fetch: EventSource cannot send a bearer header).
 * After a dropped connection it reconnects with Last-Event-ID = the last record's id (its step and index at that step), so no
 * record is lost or repeated. Handlers: metric(record), state(state), end(state), error(err).
 */
export function metricStream(jobId, on, signal) {
  const status = { lastEventId: null, connects: 0 };
  async function connect() {
    const headers = { Accept: "text/event-stream" };
    if (status.lastEventId !== null) headers["Last-Event-ID"] = status.lastEventId;
    const resp = await api(`/v1/jobs/${enc(jobId)}/metrics`, { headers, raw: true, signal });
    status.connects += 1;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (dispatch(block)) return true;
      }
    }
  }
  function dispatch(block) {
    let event = "message", id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = val;
      else if (field === "data") data.push(val);
      else if (field === "id") id = val;
    }
    if (!data.length) return false;
    const payload = JSON.parse(data.join("\n"));
    if (event === "metric") {
      on.metric?.(payload);
      if (id !== null) status.lastEventId = id;
    } else if (event === "state") on.state?.(payload.state);
    else if (event === "end") { on.end?.(payload.state); return true; }
    return false;
  }
  (async () => {
    let delay = 500;
    while (!signal.aborted) {
      try {
        if (await connect()) return;
        delay = 500;
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && err.status !== 503) { on.error?.(err); return; }
      }
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 4000);
    }
  })();
  return status;
}

/** Every metric record of a job (paged with ?after_step=). */
export async function allMetrics(jobId, signal) {
  const out = [];
  let after = null;
  for (;;) {
    const q = after === null ? "" : `&after_step=${after}`;
    const page = await api(`/v1/jobs/${enc(jobId)}/metrics?limit=5000${q}`, { signal });
    if (!page.items.length) return out;
    out.push(...page.items);
    after = page.next_after_step;
  }
}
