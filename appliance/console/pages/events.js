// Events: the log newest first, filtered by kind and MAC, paged backwards,
// and followed live (server-sent events read through fetch).

import { api, follow } from '../api.js';
import { h, put, problem, when, field } from '../ui.js';

function row(e, fresh) {
  return h('tr', { class: fresh ? 'fresh' : '', 'data-id': e.id },
    h('td', {}, String(e.id)),
    h('td', {}, when(e.time)),
    h('td', {}, e.kind),
    h('td', {}, e.mac ? h('code', {}, e.mac) : '—'),
    h('td', { class: 'detail' }, h('code', {}, JSON.stringify(e.detail))));
}

export async function render(main) {
  const kind = h('input', { id: 'ev-kind', placeholder: 'dhcp, agent.checkin, power…', autocomplete: 'off' });
  const mac = h('input', { id: 'ev-mac', placeholder: 'aa:bb:cc:dd:ee:ff', autocomplete: 'off' });
  const system = h('input', { id: 'ev-system', placeholder: 'system name', autocomplete: 'off' });
  const live = h('input', { id: 'ev-live', type: 'checkbox', checked: true });
  const liveState = h('span', { id: 'live-state', class: 'muted', 'aria-live': 'polite' });
  const tbody = h('tbody', { id: 'event-rows' });
  const more = h('button', { type: 'button', id: 'older' }, 'Older events');
  const err = h('div', {});
  let stop = null;
  let older = null;
  let newest = 0;

  const query = () => {
    const q = [];
    if (kind.value.trim()) q.push(`kind=${encodeURIComponent(kind.value.trim())}`);
    if (mac.value.trim()) q.push(`mac=${encodeURIComponent(mac.value.trim().toLowerCase())}`);
    return q;
  };

  async function load(before) {
    const q = ['order=newest', 'limit=50', ...query()];
    if (before) q.push(`before=${before}`);
    try {
      const p = await api('GET', `/api/v1/events?${q.join('&')}`);
      put(err);
      if (!before) { tbody.replaceChildren(); newest = p.next; }
      for (const e of p.items) tbody.append(row(e, false));
      if (!tbody.children.length) tbody.append(h('tr', { class: 'empty' }, h('td', { colspan: 5, class: 'muted' }, 'No events match.')));
      older = p.older || null;
      more.hidden = !older;
    } catch (e) { put(err, problem(e)); }
  }

  function restartLive() {
    if (stop) { stop(); stop = null; }
    liveState.textContent = '';
    if (!live.checked) return;
    const q = [`after=${newest}`, ...query()];
    stop = follow(`/api/v1/events?${q.join('&')}`, (e) => {
      const empty = tbody.querySelector('tr.empty');
      if (empty) empty.remove();
      tbody.prepend(row(e, true));
      while (tbody.children.length > 500) tbody.lastChild.remove();
    }, (s) => { liveState.textContent = s === 'live' ? '● live' : s; });
  }

  const form = h('form', { class: 'row filters', id: 'ev-filters' },
    field('Kind', kind), field('System', system), field('MAC', mac),
    h('div', { class: 'field check' }, live, h('label', { for: 'ev-live' }, 'Follow live')),
    h('button', { type: 'submit' }, 'Filter'), liveState);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    // A system is followed by its first MAC (events name machines by MAC).
    if (system.value.trim()) {
      try {
        const sys = await api('GET', `/api/v1/systems/${encodeURIComponent(system.value.trim())}`);
        const first = (sys.interfaces || []).find((i) => i.mac);
        if (!first) throw new Error(`system ${sys.name} has no MAC address`);
        mac.value = first.mac;
      } catch (e) { put(err, problem(e)); return; }
    }
    await load();
    restartLive();
  });
  live.addEventListener('change', restartLive);
  more.addEventListener('click', () => older && load(older));

  put(main, h('h1', {}, 'Events'), form, err,
    h('div', { class: 'scroll' }, h('table', { class: 'events cards' },
      h('thead', {}, h('tr', {}, ['#', 'Time (UTC)', 'Kind', 'MAC', 'Detail'].map((c) => h('th', { scope: 'col' }, c)))),
      tbody)),
    more);
  await load();
  restartLive();
  return () => stop && stop();
}
