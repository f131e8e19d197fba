// The JSON API with the API key from sessionStorage (kept for this browser session only).
const KEY = "msgldm.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function request(path, { method = "GET", json, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.key}` };
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, signal, body: json === undefined ? undefined : JSON.stringify(json) });
  if (!res.ok) {
    let problem = {};
    try { problem = await res.json(); } catch { /* not problem+json */ }
    if (res.status === 401) window.dispatchEvent(new CustomEvent("msgldm:unauthorized"));
    throw new ApiError(res.status, problem.code || `http_${res.status}`, problem.detail || res.statusText);
  }
  return res;
}

export async function api(path, options) {
  return (await request(path, options)).json();
}

/** Bytes of a file, reporting progress as (loaded, total). */
export async function fetchBytes(path, onProgress) {
  const res = await request(path);
  const total = Number(res.headers.get("Content-Length")) || 0;
  const reader = res.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    if (onProgress) onProgress(loaded, total);
  }
  const out = new Uint8Array(loaded);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out.buffer;
}

export async function fetchBlobUrl(path) {
  const res = await request(path);
  return URL.createObjectURL(await res.blob());
}

/** Save a result: fetched with the key (a plain link cannot carry it), then handed to the browser as a download. */
export async function download(path, filename) {
  const url = await fetchBlobUrl(path);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
