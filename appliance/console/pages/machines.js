// Machines: inventory systems and discovered agents in one table, filtered
// and paged in the browser (one request per list: 10,000 systems is one
// ~2 MB JSON answer and a filter pass takes a few milliseconds), and the
// one-step enlistment of a discovered agent into a system.

import { api, list } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, field, ago, bytes } from '../ui.js';

const PAGE = 50;

function hwSummary(hw) {
  if (!hw) return '';
  const disks = (hw.disks || []).map((d) => bytes(d.size_bytes)).join(' + ');
  return [hw.vendor, hw.product, hw.cpus ? `${hw.cpus} CPU` : '', hw.memory_bytes ? bytes(hw.memory_bytes) : '', disks]
    .filter(Boolean).join(' · ');
}

/** One row per system, plus one per agent whose MAC no system claims. */
export function rows(systems, agents, status) {
  const byMac = new Map();
  for (const a of agents) byMac.set(a.mac.toLowerCase(), a);
  const st = new Map(status.map((s) => [s.system, s]));
  const claimed = new Set();
  const out = [];
  for (const s of systems) {
    const macs = (s.interfaces || []).map((i) => (i.mac || '').toLowerCase()).filter(Boolean);
    let agent = null;
    for (const m of macs) { claimed.add(m); agent = agent || byMac.get(m); }
    const ip = (s.interfaces || []).map((i) => i.ip).filter(Boolean).join(' ');
    const reported = st.has(s.name) ? st.get(s.name).state : 'unknown';
    const state = reported !== 'unknown' ? reported : (s.netboot ? 'netboot' : 'local boot');
    const r = {
      kind: 'system', name: s.name, mac: macs.join(' '), ip, target: s.profile || s.image || '',
      hostname: s.hostname || '', state, agent, hw: agent ? hwSummary(agent.hardware) : '',
    };
    r.hay = `${r.name} ${r.mac} ${r.ip} ${r.target} ${r.hostname} ${r.state}`.toLowerCase();
    out.push(r);
  }
  for (const a of agents) {
    if (claimed.has(a.mac.toLowerCase())) continue;
    const r = {
      kind: 'discovered', name: '', mac: a.mac, ip: a.address || '', target: '', hostname: '',
      state: `checked in ${ago(a.last_seen)}`, agent: a, hw: hwSummary(a.hardware),
    };
    r.hay = `${r.mac} ${r.ip} discovered ${r.hw}`.toLowerCase();
    out.push(r);
  }
  return out;
}

/** The page's three lists, fetched in parallel (also while the console
 * checks the token, when this is the first page opened). */
export function prefetch() {
  return Promise.all([
    list('/api/v1/systems'),
    list('/api/v1/agents'),
    list('/api/v1/status').catch(() => []),
  ]);
}

export async function render(main, _args, early) {
  const [systems, agents, status] = await (early || prefetch());
  let all = rows(systems, agents, status);
  let profiles = null;
  const state = { q: '', kind: 'all', page: 0 };

  const search = h('input', { id: 'search', type: 'search', placeholder: 'name, MAC, IP, profile, state…', autocomplete: 'off' });
  const kind = h('select', { id: 'kind-filter' },
    h('option', { value: 'all' }, 'Systems and discovered'),
    h('option', { value: 'system' }, 'Systems only'),
    h('option', { value: 'discovered' }, 'Discovered agents only'));
  const count = h('p', { id: 'count', class: 'muted', 'aria-live': 'polite' });
  const tbody = h('tbody', { id: 'machine-rows' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages of machines' });
  const enlistBox = h('div', { id: 'enlist-box' });

  function filtered() {
    const words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    return all.filter((r) => (state.kind === 'all' || r.kind === state.kind) && words.every((w) => r.hay.includes(w)));
  }

  function draw() {
    const list = filtered();
    const pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const slice = list.slice(state.page * PAGE, state.page * PAGE + PAGE);
    const nsys = all.filter((r) => r.kind === 'system').length;
    count.textContent = `${list.length} of ${all.length} shown (${nsys} systems, ${all.length - nsys} discovered)`;
    put(tbody, slice.map((r) => h('tr', { class: r.kind, 'data-mac': r.mac },
      h('td', {}, r.kind === 'system'
        ? h('a', { href: `#/systems/${encodeURIComponent(r.name)}` }, r.name)
        : h('span', { class: 'tag' }, 'discovered')),
      h('td', {}, h('code', {}, r.mac || '—')),
      h('td', {}, r.ip || '—'),
      h('td', {}, r.target || '—'),
      h('td', {}, r.state),
      h('td', { class: 'hw' }, r.hw || '—'),
      h('td', {}, r.kind === 'discovered' && session.write
        ? h('button', { type: 'button', class: 'enlist', 'data-write': '', 'aria-label': `Enlist ${r.mac}`, onclick: () => enlist(r) }, 'Enlist')
        : ''))));
    put(pager,
      h('button', { type: 'button', id: 'prev', disabled: state.page === 0, onclick: () => { state.page--; draw(); } }, '‹ Previous'),
      h('span', { id: 'page-of' }, `Page ${state.page + 1} of ${pages}`),
      h('button', { type: 'button', id: 'next', disabled: state.page >= pages - 1, onclick: () => { state.page++; draw(); } }, 'Next ›'));
  }

  async function enlist(r) {
    if (!profiles) profiles = await list('/api/v1/profiles').catch(() => []);
    const name = h('input', { id: 'enlist-name', required: true, value: `node-${r.mac.replace(/:/g, '').slice(-6)}`, pattern: '[A-Za-z0-9._-]+' });
    const profile = h('select', { id: 'enlist-profile', required: true },
      profiles.length ? profiles.map((p) => h('option', { value: p.name }, p.name)) : h('option', { value: '' }, 'no profiles yet'));
    const err = h('div', { 'aria-live': 'assertive' });
    const form = h('form', { class: 'card enlist-form', id: 'enlist-form', 'aria-labelledby': 'enlist-h' },
      h('h2', { id: 'enlist-h' }, `Enlist ${r.mac}`),
      h('p', { class: 'muted' }, r.hw),
      h('div', { class: 'row' }, field('System name', name), field('Profile', profile)),
      err,
      h('div', { class: 'row' },
        h('button', { type: 'submit', class: 'primary', id: 'enlist-submit' }, 'Create system'),
        h('button', { type: 'button', onclick: () => put(enlistBox) }, 'Cancel')));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const nic = (r.agent.hardware.nics || []).find((n) => n.mac.toLowerCase() === r.mac.toLowerCase());
      const body = {
        name: name.value.trim(), profile: profile.value, hostname: name.value.trim(),
        interfaces: [{ name: nic ? nic.name : 'eth0', mac: r.mac.toLowerCase() }],
      };
      try {
        await api('POST', '/api/v1/systems', body);
        flash(`Enlisted ${r.mac} as ${body.name}`);
        put(enlistBox);
        const fresh = await list('/api/v1/systems');
        all = rows(fresh, agents, status);
        draw();
      } catch (e) {
        put(err, problem(e));
      }
    });
    put(enlistBox, form);
    name.focus();
  }

  let t;
  search.addEventListener('input', () => { clearTimeout(t); t = setTimeout(() => { state.q = search.value; state.page = 0; draw(); }, 80); });
  kind.addEventListener('change', () => { state.kind = kind.value; state.page = 0; draw(); });

  put(main,
    h('h1', {}, 'Machines'),
    h('div', { class: 'row filters' }, field('Search', search), field('Show', kind)),
    count,
    enlistBox,
    h('div', { class: 'scroll' }, h('table', { class: 'machines cards' },
      h('caption', { class: 'sr-only' }, 'Systems and discovered agents'),
      h('thead', {}, h('tr', {}, ['Name', 'MAC', 'Address', 'Profile / image', 'State', 'Hardware', ''].map((c) => h('th', { scope: 'col' }, c)))),
      tbody)),
    pager);
  draw();
}
