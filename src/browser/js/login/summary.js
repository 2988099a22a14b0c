/* Summarises the page for login classification (see `login::PageSummary`): visible inputs,
   buttons, links, iframes, headings and error-looking texts, each element with a unique CSS
   selector; no field values. Returns a JSON string. */
(() => {
  const clean = (s, n) => String(s || '').replace(/\s+/g, ' ').trim().slice(0, n || 120);
  const vis = (el) => {
    if (!el || !el.isConnected) return false;
    if (typeof el.checkVisibility === 'function' &&
        !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
    const r = el.getBoundingClientRect();
    return r.width > 1 && r.height > 1;
  };
  const esc = (s) => (window.CSS && CSS.escape) ? CSS.escape(s) : String(s).replace(/[^a-zA-Z0-9_-]/g, (c) => '\\' + c);
  const uniqueId = (el) => {
    if (!el.id) return false;
    try { return document.querySelectorAll('#' + esc(el.id)).length === 1; } catch (e) { return false; }
  };
  const selector = (el) => {
    if (uniqueId(el)) return '#' + esc(el.id);
    const parts = [];
    let node = el;
    while (node && node.nodeType === 1 && node !== document.documentElement) {
      if (node !== el && uniqueId(node)) { parts.unshift('#' + esc(node.id)); break; }
      let part = node.localName;
      const parent = node.parentElement;
      if (parent) {
        const same = Array.from(parent.children).filter((c) => c.localName === node.localName);
        if (same.length > 1) part += ':nth-of-type(' + (same.indexOf(node) + 1) + ')';
      }
      parts.unshift(part);
      node = parent;
    }
    return parts.join(' > ');
  };
  const labelOf = (el) => {
    let t = '';
    if (el.labels && el.labels.length) t = Array.from(el.labels).map((l) => l.innerText).join(' ');
    const by = el.getAttribute('aria-labelledby');
    if (!t && by) t = by.split(/\s+/).map((id) => { const n = document.getElementById(id); return n ? n.innerText : ''; }).join(' ');
    return clean(t);
  };
  const forms = Array.from(document.forms);
  const formIndex = (el) => { const f = el.form || el.closest('form'); return f ? forms.indexOf(f) : -1; };
  const pwForms = new Set();
  document.querySelectorAll('input[type=password]').forEach((p) => { if (vis(p)) pwForms.add(formIndex(p)); });
  const skip = ['hidden', 'submit', 'button', 'image', 'reset', 'checkbox', 'radio', 'file', 'range', 'color'];
  const inputs = [];
  for (const el of document.querySelectorAll('input, textarea, select, [contenteditable=""], [contenteditable=true], [role=textbox]')) {
    if (inputs.length >= 60) break;
    if (!vis(el)) continue;
    let kind;
    if (el.localName === 'input') kind = (el.getAttribute('type') || 'text').toLowerCase();
    else if (el.localName === 'textarea') kind = 'textarea';
    else if (el.localName === 'select') kind = 'select';
    else if (el.isContentEditable) kind = 'contenteditable';
    else kind = 'textbox';
    if (skip.includes(kind)) continue;
    const f = formIndex(el);
    const rich = kind === 'contenteditable' || kind === 'textbox';
    inputs.push({
      kind, name: clean(el.getAttribute('name')), id: clean(el.id),
      autocomplete: clean(el.getAttribute('autocomplete')), placeholder: clean(el.getAttribute('placeholder')),
      label: labelOf(el), aria: clean(el.getAttribute('aria-label')), selector: selector(el), form: f,
      in_password_form: f >= 0 && pwForms.has(f), filled: rich ? !!clean(el.innerText) : !!el.value,
      disabled: !!el.disabled, readonly: !!el.readOnly,
    });
  }
  const buttons = [];
  for (const el of document.querySelectorAll('button, a, input[type=submit], input[type=button], input[type=image], [role=button], [role=link], [role=menuitem]')) {
    if (buttons.length >= 80) break;
    if (!vis(el)) continue;
    const isInput = el.localName === 'input';
    const text = clean(isInput ? el.value : el.innerText, 80);
    const aria = clean(el.getAttribute('aria-label') || el.getAttribute('title'), 80);
    const type = (el.getAttribute('type') || (el.localName === 'button' ? 'submit' : '')).toLowerCase();
    const f = formIndex(el);
    buttons.push({
      tag: el.localName, text, aria, selector: selector(el), form: f,
      submit: (el.localName === 'button' || isInput) && type === 'submit' && f >= 0,
    });
  }
  const iframes = Array.from(document.querySelectorAll('iframe')).slice(0, 20).map((el) => {
    let src = el.getAttribute('src') || '';
    try { const u = new URL(src, location.href); const size = u.searchParams.get('size'); src = u.origin + u.pathname + (size ? '?size=' + size : ''); } catch (e) { src = clean(src, 200); }
    return { src, visible: vis(el), selector: selector(el) };
  });
  const headings = [];
  for (const el of document.querySelectorAll('h1, h2, h3, [role=heading]')) {
    if (headings.length >= 10) break;
    const t = clean(el.innerText, 120);
    if (t && vis(el)) headings.push(t);
  }
  const errors = [];
  const addError = (el) => {
    if (errors.length >= 5 || !vis(el) || el.querySelector('input, textarea, select')) return;
    const t = clean(el.innerText, 400);
    if (t && t.length <= 300 && !errors.some((e) => e.includes(t) || t.includes(e))) errors.push(t);
  };
  document.querySelectorAll('[role=alert], [aria-live=assertive], .error, .errors, .alert-danger, .invalid-feedback, .form-error, .field-error, [class*="error" i], [id*="error" i], [data-error]').forEach(addError);
  document.querySelectorAll('form [aria-live]').forEach(addError);
  const markers = [];
  for (const el of document.querySelectorAll('[aria-label], [role]')) {
    if (markers.length >= 5) break;
    const v = clean((el.getAttribute('role') || '') + ' ' + (el.getAttribute('aria-label') || ''), 80);
    if (/captcha|challenge|verification|human/i.test(v) && vis(el)) markers.push(v);
  }
  const solved = Array.from(document.querySelectorAll('[name="g-recaptcha-response"], [name="h-captcha-response"], [name="cf-turnstile-response"]')).some((e) => !!e.value);
  return JSON.stringify({
    url: location.href, title: clean(document.title), doc: performance.timeOrigin, ready: document.readyState,
    inputs, buttons, iframes, headings, errors, markers, captcha_solved: solved,
    text: clean(document.body ? document.body.innerText : '', 3000),
  });
})()
