/* Finds the chat input, remembers it under window[KEY], focuses it and selects its content (so
   typing replaces a draft). Runs as the body of a function (see `chatbox::script`), with `KEY`,
   the helpers of helpers.js and the named constants bound; returns a JSON string. */
const cands = [];
const sel = 'textarea, [contenteditable=""], [contenteditable="true"], [contenteditable="plaintext-only"], [role=textbox], input:not([type]), input[type=text], input[type=search]';
for (const el of document.querySelectorAll(sel)) {
  if (!vis(el) || disabled(el) || el.readOnly) continue;
  if (el.parentElement && el.parentElement.isContentEditable) continue;
  const form = el.closest('form');
  if (form && Array.from(form.querySelectorAll('input[type=password]')).some(vis)) continue;
  const hint = [el.getAttribute('placeholder'), el.getAttribute('aria-label'), el.getAttribute('aria-placeholder'),
    el.getAttribute('data-placeholder'), el.getAttribute('title'), labelOf(el), el.getAttribute('name'), el.id].join(' ');
  const rich = el.localName === 'textarea' || el.isContentEditable || el.getAttribute('role') === 'textbox';
  const chatty = /message|ask|prompt|chat|type|send|question|anything|reply|talk|write/i.test(hint);
  const searchy = /search|filter|find|e-?mail|user|login|phone|url/i.test(hint) || el.type === 'search';
  if (!rich && !chatty) continue;
  const r = el.getBoundingClientRect();
  let score = (rich ? 3 : 0) + (chatty ? 2 : 0) - (searchy ? 4 : 0);
  score += Math.min((r.width * r.height) / 20000, 2);
  if (r.top > window.innerHeight / 2) score += 1;
  if (document.activeElement === el) score += 1;
  cands.push({ el, score });
}
cands.sort((a, b) => b.score - a.score);
if (!cands.length) return JSON.stringify({ found: false });
const el = cands[0].el;
window[KEY] = { input: el };
el.scrollIntoView({ block: 'center' });
el.focus();
if (typeof el.select === 'function') el.select();
else if (el.isContentEditable) {
  const range = document.createRange();
  range.selectNodeContents(el);
  const s = window.getSelection();
  s.removeAllRanges();
  s.addRange(range);
}
return JSON.stringify({ found: true, kind: el.localName, candidates: cands.length });
