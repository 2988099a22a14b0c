/* The page's URL, user agent, origin storage (local and session) and <meta> name/content pairs, as
   a JSON string. Storage access throws on opaque origins: that yields empty maps. */
(() => {
  const dump = (name) => { try { const s = window[name]; const o = {}; for (let i = 0; i < s.length; i++) { const k = s.key(i); o[k] = s.getItem(k); } return o; } catch (e) { return {}; } };
  const meta = {};
  document.querySelectorAll('meta[content]').forEach((m) => {
    const name = m.getAttribute('name') || m.getAttribute('property');
    if (name && !(name in meta)) meta[name] = m.getAttribute('content');
  });
  return JSON.stringify({ url: location.href, ua: navigator.userAgent, local: dump('localStorage'), session: dump('sessionStorage'), meta });
})()
