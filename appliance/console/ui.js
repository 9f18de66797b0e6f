// DOM helpers: elements built with text nodes only (no innerHTML, so no
// value from the network is ever parsed as markup), a confirmation dialog
// and the status line.

/** h('a', {href: '#/x', class: 'btn'}, 'text', child, …) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) add(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function put(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

let flashTimer;
/** A message in the status line (announced to screen readers). */
export function flash(msg, kind = 'ok') {
  const f = document.getElementById('flash');
  f.className = `flash ${kind}`;
  f.textContent = msg;
  f.dataset.keep = location.hash; // a page change clears it, unless to here
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { f.textContent = ''; f.className = 'flash'; }, 8000);
}

/** An error box (role=alert) for a failed call. */
export function problem(e) {
  const code = e && e.code ? ` (${e.code})` : '';
  return h('p', { class: 'error', role: 'alert' }, `${e && e.message ? e.message : e}${code}`);
}

/**
 * Asks before a destructive action; resolves true when confirmed (with
 * `askReason`: the reason typed, or false when cancelled).
 */
export function confirmAction(question, confirmLabel = 'Confirm', askReason = false) {
  return new Promise((resolve) => {
    const reason = askReason ? h('input', { id: 'confirm-reason', autocomplete: 'off', maxlength: '300' }) : null;
    const dlg = h('dialog', { class: 'confirm', 'aria-labelledby': 'confirm-q' },
      h('p', { id: 'confirm-q' }, question),
      reason ? field('Reason (recorded with the job)', reason) : null,
      h('div', { class: 'row' },
        h('button', { type: 'button', class: 'danger', id: 'confirm-yes', onclick: () => dlg.close('yes') }, confirmLabel),
        h('button', { type: 'button', id: 'confirm-no', onclick: () => dlg.close('no') }, 'Cancel')));
    dlg.addEventListener('close', () => {
      dlg.remove();
      const yes = dlg.returnValue === 'yes';
      resolve(yes && reason ? reason.value.trim() || 'no reason given' : yes);
    });
    document.body.append(dlg);
    dlg.showModal();
    dlg.querySelector('#confirm-no').focus();
  });
}

/** A labelled form field. */
export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, hint ? h('small', {}, hint) : null);
}

export function when(t) {
  if (!t) return '—';
  const d = new Date(t * 1000);
  return d.toISOString().replace('T', ' ').slice(0, 19);
}

export function ago(t) {
  if (!t) return '—';
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function bytes(n) {
  if (!n) return '0 B';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function duration(s) {
  s = Math.round(s);
  const d = Math.floor(s / 86400), hh = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d} d ${hh} h` : hh ? `${hh} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

export function short(digest) {
  if (!digest) return '—';
  return digest.replace(/^sha256:/, '').slice(0, 12);
}
