/* Helpers every chat box script gets: visibility, normalised text, class and label of an element,
   whether it is disabled. */
const vis = (el) => {
  if (!el || !el.isConnected) return false;
  if (typeof el.checkVisibility === 'function' &&
      !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
  const r = el.getBoundingClientRect();
  return r.width > 1 && r.height > 1;
};
const norm = (s) => String(s || '').replace(/\s+/g, ' ').trim();
const cls = (el) => { const c = el.className; return typeof c === 'string' ? c : (c && c.baseVal) || ''; };
const labelOf = (el) => {
  let t = '';
  if (el.labels && el.labels.length) t = Array.from(el.labels).map((l) => l.innerText).join(' ');
  const by = el.getAttribute('aria-labelledby');
  if (!t && by) t = by.split(/\s+/).map((id) => { const n = document.getElementById(id); return n ? n.innerText : ''; }).join(' ');
  return t;
};
const disabled = (el) => !!el.disabled || el.getAttribute('aria-disabled') === 'true';
