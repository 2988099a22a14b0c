/* Finds the send control near the chat input; returns where to click it. Runs as the body of a
   function (see `chatbox::script`), with `KEY`, the helpers of helpers.js and the named constants
   bound; returns a JSON string. */
const st = window[KEY];
const input = st.input;
const ir = input.getBoundingClientRect();
const form = input.closest('form');
const scopes = [];
if (form) scopes.push(form);
let node = input.parentElement;
for (let i = 0; node && i < 6; i++, node = node.parentElement) scopes.push(node);
const seen = new Set();
let best = null;
for (const scope of scopes) {
  for (const el of scope.querySelectorAll('button, [role=button], input[type=submit], input[type=button], input[type=image]')) {
    if (seen.has(el)) continue;
    seen.add(el);
    if (!vis(el) || disabled(el)) continue;
    const label = [el.innerText, el.value, el.getAttribute('aria-label'), el.getAttribute('title'),
      el.getAttribute('data-testid'), el.id, cls(el), el.getAttribute('name')].join(' ');
    if (/attach|upload|file|image|photo|voice|micro|\bmic\b|record|dictat|stop|cancel|clear|emoji|setting|model|menu|more|share|search|tool|plus|log ?in|sign/i.test(label)) continue;
    const type = (el.getAttribute('type') || (el.localName === 'button' ? 'submit' : '')).toLowerCase();
    let score = 0;
    if (/send|submit|ask|\bgo\b|arrow|paper.?plane|➤|↑|→/i.test(label)) score += 4;
    if (form && el.form === form && type === 'submit') score += 3;
    if (!norm(el.innerText) && el.querySelector('svg, img')) score += 1;
    const r = el.getBoundingClientRect();
    const dx = Math.max(ir.left - r.right, r.left - ir.right, 0);
    const dy = Math.max(ir.top - r.bottom, r.top - ir.bottom, 0);
    score += Math.max(0, 2 - Math.hypot(dx, dy) / 150);
    if (!best || score > best.score) best = { el, score };
  }
}
if (!best || best.score < 4) return JSON.stringify({ found: false });
const el = best.el;
st.send = el;
el.scrollIntoView({ block: 'center' });
const r = el.getBoundingClientRect();
const x = r.left + r.width / 2, y = r.top + r.height / 2;
const hit = document.elementFromPoint(x, y);
return JSON.stringify({ found: true, x, y, hit: !!hit && (hit === el || el.contains(hit)) });
