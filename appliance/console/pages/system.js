// One system: its settings, hardware (from its agent's check-in), boot
// decision, rendered autoinstall, power state and actions, and its events.

import { api, list, text } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, confirmAction, field, when, bytes } from '../ui.js';

function section(id, title, ...body) {
  return h('section', { class: 'card', 'aria-labelledby': id }, h('h2', { id }, title), ...body);
}

function pre(id) {
  return h('pre', { id, class: 'doc', tabindex: '0' }, 'Loading…');
}

export async function render(main, [name]) {
  const sys = await api('GET', `/api/v1/systems/${encodeURIComponent(name)}`);
  const agents = await list('/api/v1/agents').catch(() => []);
  const macs = (sys.interfaces || []).map((i) => (i.mac || '').toLowerCase());
  const agent = agents.find((a) => macs.includes(a.mac.toLowerCase()));
  const hw = agent && agent.hardware;

  const bootPre = pre('boot-script');
  const autoPre = pre('autoinstall');
  const powerState = h('p', { id: 'power-state' }, '…');
  const powerBox = h('div', {});
  const events = h('tbody', { id: 'system-events' });

  put(main,
    h('p', {}, h('a', { href: '#/machines' }, '‹ Machines')),
    h('h1', {}, `System ${sys.name}`),
    section('s-settings', 'Settings',
      h('dl', { class: 'facts' },
        h('dt', {}, 'Profile / image'), h('dd', {}, sys.profile || sys.image || '—'),
        h('dt', {}, 'Hostname'), h('dd', {}, sys.hostname || '—'),
        h('dt', {}, 'Interfaces'), h('dd', {}, (sys.interfaces || []).map((i) => `${i.name} ${i.mac}${i.ip ? ` ${i.ip}` : ''}`).join(', ') || '—'),
        h('dt', {}, 'Netboot'), h('dd', { id: 'netboot' }, sys.netboot ? 'on: the next network boot installs' : 'off: boots from disk'),
        h('dt', {}, 'Kernel options'), h('dd', {}, sys.kernel_options || '—'),
        h('dt', {}, 'Power'), h('dd', {}, sys.power ? `${sys.power.type} ${sys.power.address}` : 'none configured')),
      session.write ? h('p', {}, h('a', { href: `#/inventory/systems/${encodeURIComponent(sys.name)}`, class: 'btn', 'data-write': '' }, 'Edit')) : null),
    section('s-hw', 'Hardware',
      hw ? h('dl', { class: 'facts', id: 'hardware' },
        h('dt', {}, 'Machine'), h('dd', {}, [hw.vendor, hw.product, hw.serial].filter(Boolean).join(' ') || '—'),
        h('dt', {}, 'Firmware'), h('dd', {}, hw.firmware || '—'),
        h('dt', {}, 'CPU'), h('dd', {}, `${hw.cpus} × ${hw.cpu_model || 'unknown'}`),
        h('dt', {}, 'Memory'), h('dd', {}, bytes(hw.memory_bytes)),
        h('dt', {}, 'Disks'), h('dd', {}, (hw.disks || []).map((d) => `${d.name} ${bytes(d.size_bytes)}${d.model ? ` ${d.model}` : ''}`).join(', ') || 'none'),
        h('dt', {}, 'NICs'), h('dd', {}, (hw.nics || []).map((n) => `${n.name} ${n.mac}`).join(', ') || 'none'),
        h('dt', {}, 'Last check-in'), h('dd', {}, when(agent.last_seen)))
        : h('p', { class: 'muted', id: 'hardware' }, 'No agent of this system has checked in yet.')),
    section('s-power', 'Power', powerState, powerBox),
    section('s-boot', 'Boot decision (iPXE script for its first MAC)', bootPre),
    section('s-auto', 'Rendered autoinstall', autoPre),
    section('s-events', 'Events',
      h('div', { class: 'scroll' }, h('table', { class: 'cards' },
        h('thead', {}, h('tr', {}, ['Time', 'Kind', 'Detail'].map((c) => h('th', { scope: 'col' }, c)))),
        events))));

  if (macs[0]) text(`/api/v1/boot/${encodeURIComponent(macs[0])}`).then((t) => put(bootPre, t), (e) => put(bootPre, `${e.message}`));
  else put(bootPre, 'No interface: this system cannot network-boot.');
  text(`/api/v1/systems/${encodeURIComponent(name)}/autoinstall`).then((t) => put(autoPre, t), (e) => put(autoPre, e.message));

  const refreshPower = () => api('GET', `/api/v1/systems/${encodeURIComponent(name)}/power`)
    .then((p) => put(powerState, `State: ${p.state} (via ${p.driver})`), (e) => put(powerState, problem(e)));
  if (sys.power && sys.power.type) refreshPower(); else put(powerState, 'No BMC configured for this system.');

  if (session.write && sys.power && sys.power.type) {
    const boot = h('select', { id: 'power-boot' },
      h('option', { value: '' }, 'normal boot order'),
      h('option', { value: 'network' }, 'once from the network'),
      h('option', { value: 'cd' }, 'once from the CD (virtual media)'),
      h('option', { value: 'disk' }, 'once from the disk'));
    const act = (action) => async () => {
      const dev = boot.value;
      if (!await confirmAction(`Power ${action} ${name}${dev ? `, booting ${boot.selectedOptions[0].textContent}` : ''}?`, `Power ${action}`)) return;
      try {
        await api('POST', `/api/v1/systems/${encodeURIComponent(name)}/power`, dev ? { action, boot: dev } : { action });
        flash(`Power ${action} sent to ${name}`);
        refreshPower();
      } catch (e) { flash(`${e.message}`, 'bad'); }
    };
    put(powerBox, field('Next boot', boot), h('div', { class: 'row', 'data-write': '' },
      ['on', 'off', 'cycle'].map((a) => h('button', { type: 'button', id: `power-${a}`, class: a === 'on' ? '' : 'danger', onclick: act(a) }, `Power ${a}`))));
  }

  if (macs[0]) {
    const p = await api('GET', `/api/v1/events?order=newest&limit=50&mac=${encodeURIComponent(macs[0])}`).catch(() => ({ items: [] }));
    put(events, p.items.length ? p.items.map((e) => h('tr', {}, h('td', {}, when(e.time)), h('td', {}, e.kind), h('td', { class: 'detail' }, h('code', {}, JSON.stringify(e.detail)))))
      : h('tr', {}, h('td', { colspan: 3, class: 'muted' }, 'No events for this machine.')));
  }
}
