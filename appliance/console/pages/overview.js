// Overview: this node's identity, release, health and the networks it serves.

import { api, list } from '../api.js';
import { h, put, problem, duration, short } from '../ui.js';

function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v, id]) => [h('dt', {}, k), h('dd', id ? { id } : {}, v)]));
}

export async function render(main) {
  const [v, nets, reps, release] = await Promise.all([
    api('GET', '/api/v1/version'),
    list('/api/v1/networks').catch((e) => e),
    list('/api/v1/replicas').catch((e) => e),
    api('GET', '/api/v1/release').catch((e) => e),
  ]);
  const degraded = v.degraded || [];
  const boot = v.boot || {};
  put(main,
    h('h1', {}, 'Overview'),
    h('section', { class: 'card', 'aria-labelledby': 'ov-node' },
      h('h2', { id: 'ov-node' }, 'This appliance'),
      dl([
        ['Node id', h('code', {}, v.node_id), 'node-id'],
        ['Version', v.version],
        ['Release', v.release ? h('code', { title: v.release }, short(v.release)) : 'none (no release manifest)', 'release'],
        boot.firmware ? ['Boot', [boot.firmware, boot.medium ? ` from ${boot.medium}` : '', boot.mode ? `, ${boot.mode} mode` : ''].join(''), 'boot'] : null,
        ['Up for', duration(v.uptime_s || 0)],
        ['Children', Array.isArray(reps) ? String(reps.length) : '—'],
      ])),
    h('section', { class: `card ${degraded.length ? 'bad' : 'good'}`, 'aria-labelledby': 'ov-health' },
      h('h2', { id: 'ov-health' }, degraded.length ? `Degraded (${degraded.length})` : 'Healthy'),
      degraded.length
        ? h('ul', { id: 'degraded' }, degraded.map((d) => h('li', {}, d)))
        : h('p', { id: 'degraded' }, 'No degraded reasons.')),
    h('section', { class: 'card', 'aria-labelledby': 'ov-nets' },
      h('h2', { id: 'ov-nets' }, 'Networks served'),
      nets instanceof Error ? problem(nets)
        : nets.length === 0 ? h('p', { class: 'muted' }, 'This appliance serves no provisioning network yet (POST /api/v1/networks with an interface and a CIDR).')
          : h('div', { class: 'scroll' }, h('table', {},
            h('thead', {}, h('tr', {}, ['Interface', 'Address', 'Mode', 'Pool', 'State'].map((c) => h('th', { scope: 'col' }, c)))),
            h('tbody', {}, nets.map((n) => h('tr', {},
              h('td', {}, n.iface),
              h('td', {}, n.cidr),
              h('td', {}, String(n.mode || '—')),
              h('td', {}, n.pool || 'automatic'),
              h('td', {}, n.running ? 'serving' : 'stopped'))))))),
    release instanceof Error ? null : h('section', { class: 'card', 'aria-labelledby': 'ov-rel' },
      h('h2', { id: 'ov-rel' }, 'Rebuild'),
      release.cached
        ? dl([
          ['Verdict', release.cached.identical ? 'identical: this node rebuilt its own image bit for bit' : 'DIFFERENT from the running release', 'rebuild-verdict'],
          ['Rebuilt', h('code', { title: release.cached.rebuilt_release }, short(release.cached.rebuilt_release))],
          ['Took', duration(release.cached.seconds || 0)],
        ])
        : h('p', { class: 'muted', id: 'rebuild-verdict' }, 'No rebuild has run on this node yet (POST /api/v1/release/rebuild, or `appliance rebuild`).')),
  );
}
