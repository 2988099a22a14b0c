/* Which of the CSS selectors match a visible element (an invalid selector counts as not visible):
   (selectors) => JSON array of booleans. */
(selectors) => JSON.stringify(selectors.map((s) => {
  try {
    const el = document.querySelector(s);
    if (!el) return false;
    if (typeof el.checkVisibility === 'function' && !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
    const r = el.getBoundingClientRect();
    return r.width > 1 && r.height > 1;
  } catch (e) {
    return false;
  }
}))
