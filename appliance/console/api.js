// The REST API client: the token lives in sessionStorage only (never in a
// URL, never in a cookie); every call is a documented /api/v1 route.

const KEY = 'appliance.token';

export const token = {
  get: () => sessionStorage.getItem(KEY) || '',
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

/** An API refusal: HTTP status, stable code and the server's message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  const h = { ...extra };
  const t = token.get();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function fail(r) {
  let code = `http_${r.status}`;
  let message = r.statusText || 'request failed';
  try {
    const b = await r.json();
    code = b.code || code;
    message = b.message || message;
  } catch (_) { /* not JSON */ }
  return new ApiError(r.status, code, message);
}

/** Calls the API; JSON in and out (text when the answer is not JSON). */
export async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (!r.ok) throw await fail(r);
  if (r.status === 204) return null;
  const ct = r.headers.get('content-type') || '';
  return ct.includes('json') ? r.json() : r.text();
}

/**
 * Every item of a list route: follows the one list shape
 * `{items, next}` page by page (`?limit=&after=`) until `next` is null.
 */
export async function list(path) {
  const out = [];
  let after = null;
  const first = `${path}${path.includes('?') ? '&' : '?'}limit=10000`;
  for (;;) {
    const url = after === null ? first : `${first}&after=${encodeURIComponent(after)}`;
    const page = await api('GET', url);
    out.push(...page.items);
    if (page.next === null || page.next === undefined) return out;
    after = page.next;
  }
}

/** GET of one object: its JSON and its ETag (send back as If-Match). */
export async function tagged(path) {
  const r = await fetch(path, { headers: headers({}) });
  if (!r.ok) throw await fail(r);
  return { obj: await r.json(), etag: r.headers.get('etag') };
}

/** PUT with If-Match `etag` (when known); returns the object's new ETag. */
export async function putTagged(path, body, etag) {
  const h = { 'Content-Type': 'application/json' };
  if (etag) h['If-Match'] = etag;
  const r = await fetch(path, { method: 'PUT', headers: headers(h), body: JSON.stringify(body) });
  if (!r.ok) throw await fail(r);
  return r.headers.get('etag');
}

/** GET as text (rendered files, boot scripts). */
export async function text(path) {
  const r = await fetch(path, { headers: headers({}) });
  if (!r.ok) throw await fail(r);
  return r.text();
}

/**
 * Follows the server-sent events at `path` (fetch, so the token goes in a
 * header, never in the URL); calls onEvent(parsed JSON) for each. Returns
 * a function that stops. Reconnects after errors from the last id seen.
 */
export function follow(path, onEvent, onState) {
  const ctl = new AbortController();
  let last = 0;
  let stopped = false;
  const run = async () => {
    while (!stopped) {
      try {
        // A reconnect resumes after the last id seen, replacing the
        // caller's own `after` (the API refuses a parameter given twice).
        const u = new URL(path, location.href);
        if (last) u.searchParams.set('after', String(last));
        const url = `${u.pathname}${u.search}`;
        const r = await fetch(url, { headers: headers({ Accept: 'text/event-stream' }), signal: ctl.signal });
        if (!r.ok) throw await fail(r);
        onState && onState('live');
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
            if (!data) continue;
            try {
              const ev = JSON.parse(data);
              if (typeof ev.id === 'number') last = Math.max(last, ev.id);
              onEvent(ev);
            } catch (_) { /* keep-alive or foreign line */ }
          }
        }
      } catch (e) {
        if (stopped) return;
        onState && onState(e instanceof ApiError ? `refused: ${e.message}` : 'reconnecting');
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) return;
      }
      if (!stopped) await new Promise((res) => setTimeout(res, 1500));
    }
  };
  run();
  return () => { stopped = true; ctl.abort(); };
}

/**
 * Downloads `path` (a route that needs the token, so no plain link) as a
 * file named `name`; resolves to its size in bytes.
 */
export async function download(path, name) {
  const r = await fetch(path, { headers: headers({}) });
  if (!r.ok) throw await fail(r);
  const blob = await r.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return blob.size;
}
