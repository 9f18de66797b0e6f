// Inventory: distros, profiles, systems, repos, images, templates and
// snippets: list, create, edit (validation messages come from the API),
// delete, and a live preview of a template rendered for a chosen system.

import { api, list as listAll, tagged, putTagged } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, confirmAction, field } from '../ui.js';

const KINDS = ['distros', 'profiles', 'systems', 'repos', 'images', 'templates', 'snippets'];

/** Every field a new object shows, in order. */
const BLANK = {
  distros: { name: '', kernel: '', initrd: '', arch: 'x86_64', breed: 'debian', os_version: '', kernel_options: '', variables: {}, comment: '' },
  profiles: { name: '', distro: '', parent: '', autoinstall: '', kernel_options: '', repos: [], variables: {}, comment: '' },
  systems: { name: '', profile: '', image: '', hostname: '', interfaces: [], kernel_options: '', variables: {}, power: {}, netboot: true, comment: '' },
  repos: { name: '', mirror: '', breed: 'apt', arch: 'x86_64', components: [], comment: '' },
  images: { name: '', type: 'capture', reference: '', arch: 'x86_64', variables: {}, comment: '' },
  templates: { name: '', body: '' },
  snippets: { name: '', body: '' },
};
/** Fields the API wants absent rather than empty ("exactly one of"). */
const OPTIONAL = ['distro', 'parent', 'profile', 'image'];
/** Columns of the list, besides the name. */
const COLUMNS = {
  distros: ['breed', 'arch', 'os_version'],
  profiles: ['distro', 'parent', 'autoinstall'],
  systems: ['profile', 'image', 'hostname'],
  repos: ['breed', 'mirror'],
  images: ['type', 'arch', 'reference'],
  templates: ['origin'],
  snippets: ['origin'],
};

function label(k) { return k.replace(/_/g, ' ').replace(/^./, (c) => c.toUpperCase()); }

function input(k, v, readonly) {
  const id = `f-${k}`;
  if (typeof v === 'boolean') return h('input', { id, type: 'checkbox', checked: v, disabled: readonly, 'data-type': 'bool' });
  if (typeof v === 'number') return h('input', { id, type: 'number', value: String(v), readonly, 'data-type': 'number' });
  if (Array.isArray(v) && v.every((x) => typeof x === 'string')) {
    return h('input', { id, value: v.join(', '), readonly, 'data-type': 'list', 'aria-describedby': `${id}-hint` });
  }
  if (typeof v === 'object' && v !== null) {
    return h('textarea', { id, rows: 4, readonly, spellcheck: 'false', 'data-type': 'json' }, JSON.stringify(v, null, 2));
  }
  if (k === 'body') return h('textarea', { id, rows: 18, readonly, spellcheck: 'false', class: 'code', 'data-type': 'text' }, v);
  return h('input', { id, value: v, readonly, 'data-type': 'text', autocomplete: 'off' });
}

function read(form, keys) {
  const out = {};
  for (const k of keys) {
    const el = form.querySelector(`#f-${k}`);
    if (!el) continue;
    const t = el.dataset.type;
    if (t === 'bool') out[k] = el.checked;
    else if (t === 'number') out[k] = Number(el.value);
    else if (t === 'list') out[k] = el.value.split(',').map((s) => s.trim()).filter(Boolean);
    else if (t === 'json') {
      try { out[k] = JSON.parse(el.value || '{}'); } catch (e) { throw Object.assign(new Error(`${k}: not valid JSON (${e.message})`), { field: k }); }
    } else out[k] = el.value;
    if (OPTIONAL.includes(k) && out[k] === '') delete out[k];
  }
  return out;
}

/** Marks the field an API validation message names (`field: message`). */
function markField(form, e) {
  for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  // Messages name the field first: `kernel_options: …`, `distro "x" does not exist`.
  const m = /^([a-z_]+)\b/.exec(e.message || '');
  const name = e.field || (m && m[1]);
  const el = name && form.querySelector(`#f-${name}`);
  if (el) { el.setAttribute('aria-invalid', 'true'); el.focus(); }
}

async function list(main, kind) {
  const objs = await listAll(`/api/v1/${kind}`);
  const cols = COLUMNS[kind];
  put(main,
    h('h1', {}, 'Inventory'),
    tabs(kind),
    h('div', { class: 'row' },
      h('p', { class: 'muted', id: 'inv-count' }, `${objs.length} ${kind}`),
      session.write ? h('a', { class: 'btn primary', id: 'inv-new', href: `#/inventory/${kind}/+`, 'data-write': '' }, `New ${kind.slice(0, -1)}`) : null),
    h('div', { class: 'scroll' }, h('table', { id: 'inv-table' },
      h('thead', {}, h('tr', {}, ['Name', ...cols.map(label), ''].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, objs.slice(0, 500).map((o) => h('tr', { 'data-name': o.name },
        h('td', {}, h('a', { href: `#/inventory/${kind}/${encodeURIComponent(o.name)}` }, o.name)),
        cols.map((c) => h('td', {}, o[c] === undefined || o[c] === null || o[c] === '' ? '—' : String(o[c]))),
        h('td', {}, session.write && o.origin !== 'builtin'
          ? h('button', { type: 'button', class: 'danger small', 'data-write': '', 'aria-label': `Delete ${o.name}`, onclick: () => remove(main, kind, o.name) }, 'Delete')
          : '')))))),
    objs.length > 500 ? h('p', { class: 'muted' }, `The first 500 of ${objs.length}; the Machines page searches all systems.`) : null);
}

async function remove(main, kind, name) {
  if (!await confirmAction(`Delete ${kind.slice(0, -1)} ${name}? Its history stays in the inventory's git log.`, 'Delete')) return;
  try {
    await api('DELETE', `/api/v1/${kind}/${encodeURIComponent(name)}`);
    flash(`Deleted ${name}`);
    await list(main, kind);
  } catch (e) { flash(e.message, 'bad'); }
}

function tabs(kind) {
  return h('nav', { class: 'tabs', 'aria-label': 'Kinds' },
    KINDS.map((k) => h('a', { href: `#/inventory/${k}`, 'aria-current': k === kind ? 'page' : null }, label(k))));
}

async function edit(main, kind, name) {
  const creating = name === '+';
  // The save sends the ETag read here: a change made meanwhile is a 412.
  const got = creating ? { obj: {}, etag: null } : await tagged(`/api/v1/${kind}/${encodeURIComponent(name)}`);
  const obj = { ...BLANK[kind], ...got.obj };
  const builtin = obj.origin === 'builtin';
  delete obj.origin;
  const readonly = !session.write;
  const keys = Object.keys(obj);
  const err = h('div', { id: 'form-error', 'aria-live': 'assertive' });
  const form = h('form', { class: 'card objform', id: 'obj-form', novalidate: true },
    keys.map((k) => {
      const el = input(k, obj[k], readonly || (k === 'name' && !creating));
      const hint = el.dataset.type === 'list' ? h('small', { id: `f-${k}-hint` }, 'comma-separated') : null;
      return el.type === 'checkbox'
        ? h('div', { class: 'field check' }, el, h('label', { for: el.id }, label(k)))
        : h('div', { class: el.tagName === 'TEXTAREA' ? 'field wide' : 'field' }, h('label', { for: el.id }, label(k)), el, hint);
    }),
    h('div', { class: 'wide' }, err),
    readonly ? null : h('div', { class: 'row wide' },
      h('button', { type: 'submit', class: 'primary', id: 'save', 'data-write': '' }, creating ? 'Create' : builtin ? 'Save as inventory override' : 'Save'),
      h('a', { class: 'btn', href: `#/inventory/${kind}` }, 'Cancel')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const body = read(form, keys);
      if (creating || builtin) await api('POST', `/api/v1/${kind}`, body);
      else got.etag = await putTagged(`/api/v1/${kind}/${encodeURIComponent(name)}`, body, got.etag);
      put(err);
      if (creating || builtin) location.hash = `#/inventory/${kind}/${encodeURIComponent(body.name)}`;
      flash(`Saved ${kind.slice(0, -1)} ${body.name}`);
    } catch (e) {
      put(err, problem(e));
      markField(form, e);
    }
  });
  put(main,
    h('p', {}, h('a', { href: `#/inventory/${kind}` }, `‹ ${label(kind)}`)),
    h('h1', {}, creating ? `New ${kind.slice(0, -1)}` : `${label(kind.slice(0, -1))} ${name}`),
    builtin ? h('p', { class: 'muted' }, 'Shipped with the appliance; saving stores an override in the inventory.') : null,
    form,
    kind === 'templates' && !creating ? preview(form, name) : null);
}

function preview(form, name) {
  const sys = h('input', { id: 'preview-system', list: 'preview-systems', autocomplete: 'off', placeholder: 'system name' });
  const options = h('datalist', { id: 'preview-systems' });
  const out = h('pre', { id: 'preview', class: 'doc', tabindex: '0' }, 'Choose a system to render this template for.');
  const status = h('p', { id: 'preview-status', class: 'muted', 'aria-live': 'polite' });
  api('GET', '/api/v1/systems?limit=1000').then((p) => put(options, p.items.map((x) => h('option', { value: x.name }))), () => {});
  let seq = 0;
  const run = async () => {
    const system = sys.value.trim();
    if (!system) return;
    const mine = ++seq;
    status.textContent = 'Rendering…';
    try {
      const body = form.querySelector('#f-body').value;
      const t = await api('POST', `/api/v1/systems/${encodeURIComponent(system)}/preview`, { template: name, body });
      if (mine !== seq) return;
      put(out, t);
      out.classList.remove('failed');
      status.textContent = `Rendered for ${system} (unsaved text included; nothing was changed).`;
    } catch (e) {
      if (mine !== seq) return;
      put(out, e.message);
      out.classList.add('failed');
      status.textContent = `Rendering failed (${e.code}).`;
    }
  };
  let t;
  form.querySelector('#f-body').addEventListener('input', () => { clearTimeout(t); t = setTimeout(run, 400); });
  sys.addEventListener('change', run);
  if (!session.write) {
    return h('section', { class: 'card' }, h('h2', {}, 'Preview'), h('p', { class: 'muted' }, 'Previews render caller-supplied text and need an operator token.'));
  }
  return h('section', { class: 'card', 'aria-labelledby': 'prev-h' },
    h('h2', { id: 'prev-h' }, 'Live preview'),
    h('div', { class: 'row' }, field('Render for system', sys), h('button', { type: 'button', id: 'preview-run', onclick: run }, 'Render')),
    options, status, out);
}

export async function render(main, [kind = 'profiles', name]) {
  if (!KINDS.includes(kind)) throw new Error(`no inventory kind ${kind}`);
  if (name) await edit(main, kind, name);
  else await list(main, kind);
}
