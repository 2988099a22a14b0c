/* Reads the reply to the message carrying MARKER (PROBE is the whole message): {found, user, text,
   reasoning}. See the `chatbox` module docs. Runs as the body of a function (see
   `chatbox::script`), with `KEY`, the helpers of helpers.js and the named constants bound; returns
   a JSON string. */
const st = window[KEY];
if (!st || !st.before) return JSON.stringify({ found: false });
const composer = st.input;
const isNew = (el) => !st.before.has(el);
const probe = norm(PROBE);
const body = document.body;
const touched = Array.from(st.touched).filter((el) => el.isConnected && body && body.contains(el) && el !== body);
// The user's own message: the outermost new element showing the marker, about the probe's size.
const fresh = [];
for (const el of touched) {
  if (!isNew(el)) continue;
  fresh.push(el);
  for (const d of el.querySelectorAll('*')) fresh.push(d);
}
let user = null;
for (const el of fresh) {
  const t = norm(el.innerText);
  if (!t.includes(MARKER) || t.length > probe.length + 40) continue;
  if (composer && (el.contains(composer) || composer.contains(el))) continue;
  // The first in document order (a reply may quote the probe later), outermost there.
  if (!user || el.contains(user) || (!user.contains(el) && (el.compareDocumentPosition(user) & Node.DOCUMENT_POSITION_FOLLOWING))) user = el;
}
const excluded = (el) => (user && (el === user || el.contains(user) || user.contains(el))) ||
  (composer && (el === composer || el.contains(composer) || composer.contains(el)));
const roots = new Set();
for (let el of touched) {
  if (excluded(el)) continue;
  if (isNew(el)) {
    while (el.parentElement && el.parentElement !== body && isNew(el.parentElement) && !excluded(el.parentElement)) el = el.parentElement;
  }
  roots.add(el);
}
let list = Array.from(roots).filter((r) => !Array.from(roots).some((o) => o !== r && o.contains(r)));
if (user) list = list.filter((r) => user.compareDocumentPosition(r) & Node.DOCUMENT_POSITION_FOLLOWING);
const REASON = /reason|think|thought/i;
const attrs = (el) => [cls(el), el.id, el.getAttribute('aria-label'), el.getAttribute('title'), el.getAttribute('data-testid'), el.getAttribute('data-type')].join(' ');
const skip = (el) => ['button', 'script', 'style', 'svg', 'noscript', 'template', 'textarea', 'input', 'select'].includes(el.localName) ||
  el.getAttribute('role') === 'button' || el.getAttribute('aria-hidden') === 'true' || /sr-only|visually-hidden|screen-reader/i.test(cls(el));
const read = (root) => {
  const reasoning = Array.from(root.querySelectorAll('*')).filter((el) => el.localName === 'details' || REASON.test(attrs(el)));
  const outer = reasoning.filter((el) => !reasoning.some((o) => o !== el && o.contains(el)));
  const cut = new Set(outer);
  for (const el of root.querySelectorAll('*')) if (skip(el)) cut.add(el);
  const dirty = new Set();
  for (const el of cut) for (let p = el.parentElement; p && p !== root.parentElement; p = p.parentElement) dirty.add(p);
  const textOf = (node) => {
    if (node.nodeType === 3) return node.textContent;
    if (node.nodeType !== 1 || cut.has(node)) return '';
    if (!dirty.has(node)) return node.innerText || '';
    return Array.from(node.childNodes).map(textOf).join('\n');
  };
  const pieces = [];
  for (const el of outer) {
    let t = '';
    if (el.localName === 'details') {
      const was = el.open;
      el.open = true;
      t = Array.from(el.childNodes).filter((c) => c.localName !== 'summary').map((c) => c.nodeType === 1 ? (c.innerText || c.textContent) : c.textContent).join('\n');
      el.open = was;
    } else {
      const kids = Array.from(el.children).filter((c) => !skip(c) && !/header|title|label|toggle|summary/i.test(attrs(c)));
      t = kids.length ? kids.map((c) => c.innerText || c.textContent).join('\n') : (el.innerText || el.textContent);
    }
    if (norm(t)) pieces.push(t.trim());
  }
  return { text: textOf(root).trim(), reasoning: pieces.length ? pieces.join('\n\n') : null };
};
let best = null;
for (const root of list) {
  const r = read(root);
  if (!norm(r.text) && !r.reasoning) continue;
  if (!best || norm(r.text).length >= norm(best.text).length) best = r;
}
if (!best) return JSON.stringify({ found: false, user: !!user });
return JSON.stringify({ found: true, user: !!user, text: best.text, reasoning: best.reasoning });
