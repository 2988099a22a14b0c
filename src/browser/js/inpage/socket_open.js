/* Opens a WebSocket in the page and sends `messages` once it is open ({ok, error}); kept under
   window[key][tag] like a fetch. */
(a) => {
  const S = (window[a.key] = window[a.key] || {});
  let ws;
  try { ws = new WebSocket(a.url); } catch (e) { return JSON.stringify({ ok: false, error: String((e && e.message) || e) }); }
  S[a.tag] = { stop: () => { try { ws.close(); } catch (e) {} delete S[a.tag]; }, error: null };
  ws.addEventListener('open', () => { for (const m of a.messages) ws.send(m); });
  ws.addEventListener('error', () => { if (S[a.tag]) S[a.tag].error = 'the WebSocket failed'; });
  return JSON.stringify({ ok: true });
}
