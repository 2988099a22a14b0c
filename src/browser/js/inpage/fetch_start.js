/* Starts one flow call with fetch() in the page and returns at once ({ok, error}). The call is
   kept under window[key][tag] (stop, status, headers, body parts when `keep`, done, error,
   finished) for the other in-page scripts; its URL carries `#tag`, which finds it in the
   recorder's feed. The body is `text`, or `binary` (base64) when it is not UTF-8. */
(a) => {
  const S = (window[a.key] = window[a.key] || {});
  const ctl = new AbortController();
  let body = a.text;
  if (a.binary !== null) { const raw = atob(a.binary); body = Uint8Array.from(raw, (c) => c.charCodeAt(0)); }
  const init = { method: a.method, headers: a.headers, credentials: 'include', signal: ctl.signal };
  if (body !== null && init.method !== 'GET' && init.method !== 'HEAD') init.body = body;
  let request;
  try { request = new Request(a.url, init); } catch (e) { return JSON.stringify({ ok: false, error: String((e && e.message) || e) }); }
  const c = (S[a.tag] = { stop: () => ctl.abort(), error: null, status: 0, headers: [], parts: [], done: false, keep: a.keep });
  c.finished = fetch(request).then(async (r) => {
    c.status = r.status;
    r.headers.forEach((v, k) => c.headers.push([k, v]));
    if (r.body) { const reader = r.body.getReader(); for (;;) { const step = await reader.read(); if (step.done) break; if (c.keep) c.parts.push(step.value); } }
    c.done = true;
  }).catch((e) => { c.error = String((e && e.message) || e); });
  return JSON.stringify({ ok: true });
}
