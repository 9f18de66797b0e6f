// The family tree: this appliance's parent, itself and its children (each
// child reports its own children to its own console), sync state and
// conflicts; register a replica.

import { api, list } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, field, ago, short } from '../ui.js';

function node(title, facts, children) {
  return h('li', {},
    h('div', { class: 'node card' }, h('strong', {}, title), h('dl', { class: 'facts tight' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]))),
    children && children.length ? h('ul', {}, children) : null);
}

export async function render(main) {
  const [v, reps, sync] = await Promise.all([
    api('GET', '/api/v1/version'),
    list('/api/v1/replicas'),
    api('GET', '/api/v1/sync/status').catch((e) => e),
  ]);
  const s = sync instanceof Error ? null : sync;
  const kids = reps.map((r) => node(r.name || r.node_id, [
    ['Node', h('code', {}, r.node_id)],
    ['Status', r.status],
    ['Release', r.release ? h('code', { title: r.release }, short(r.release)) : '—'],
    ['MAC', r.mac || '—'],
    ['Last contact', ago(r.last_contact)],
  ]));
  const self = node(`This appliance`, [
    ['Node', h('code', {}, v.node_id)],
    ['Release', v.release ? h('code', { title: v.release }, short(v.release)) : '—'],
    ['Inventory', s && s.head ? h('code', { title: s.head }, short(s.head)) : '—'],
    ['Sync', !s ? 'not available' : !s.parent ? 'root of the tree (no parent)'
      : `${s.last_sync ? `last ${ago(s.last_sync)}` : 'never synced'}${s.last_error ? `, error: ${s.last_error}` : ''}`],
    ['Conflicts', s ? String(s.conflicts) : '—'],
  ], kids.length ? kids : [h('li', { class: 'muted' }, 'No children registered.')]);
  const tree = s && s.parent
    ? node('Parent', [['URL', s.parent], ['Node', h('code', {}, String(s.parent_node_id || '—'))]], [self])
    : self;

  const reg = session.write ? registerForm(main) : null;
  put(main, h('h1', {}, 'Family tree'),
    sync instanceof Error ? problem(sync) : null,
    h('ul', { class: 'tree', id: 'tree' }, tree),
    reg);
}

function registerForm(main) {
  const name = h('input', { id: 'rep-name', autocomplete: 'off' });
  const mac = h('input', { id: 'rep-mac', autocomplete: 'off', placeholder: 'aa:bb:cc:dd:ee:ff' });
  const out = h('div', { 'aria-live': 'polite' });
  const form = h('form', { class: 'card', 'aria-labelledby': 'rep-h', 'data-write': '' },
    h('h2', { id: 'rep-h' }, 'Register a replica'),
    h('div', { class: 'row' }, field('Name', name), field('MAC (optional)', mac)),
    h('button', { type: 'submit', class: 'primary' }, 'Register'), out);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = { name: name.value.trim() || undefined, mac: mac.value.trim() || undefined };
    try {
      const r = await api('POST', '/api/v1/replicas', body);
      flash(`Registered ${r.node_id}`);
      put(out, h('p', {}, 'Give the child this token once (`appliance replica join`); it is not shown again: ', h('code', { class: 'secret' }, r.token)));
    } catch (e) { put(out, problem(e)); }
  });
  return form;
}
