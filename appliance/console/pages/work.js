// Live work: installs of this appliance onto other machines and clone
// jobs (captures, deploys), with progress bars that move as events arrive.

import { api, list, follow } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, confirmAction, bytes, duration, ago } from '../ui.js';

function bar(done, total, label) {
  const pct = total ? Math.min(100, Math.floor((done * 100) / total)) : 0;
  return h('div', { class: 'bar' },
    h('progress', { max: '100', value: String(pct), 'aria-label': label }),
    h('span', {}, total ? `${pct}% · ${bytes(done)} of ${bytes(total)}` : bytes(done)));
}

function eta(job, start) {
  const el = job.updated - start;
  if (!job.total_bytes || !job.done_bytes || el <= 0) return '—';
  const rate = job.done_bytes / el;
  return `${bytes(rate)}/s, ${duration((job.total_bytes - job.done_bytes) / rate)} left`;
}

export async function render(main) {
  const body = h('div', { id: 'work' });
  const liveState = h('p', { class: 'muted', id: 'work-live', 'aria-live': 'polite' });
  put(main, h('h1', {}, 'Live work'), liveState, body);

  async function draw() {
    const [installs, jobs] = await Promise.all([
      list('/api/v1/installs').catch((e) => e),
      list('/api/v1/clone/jobs').catch((e) => e),
    ]);
    put(body,
      h('section', { class: 'card', 'aria-labelledby': 'w-inst' }, h('h2', { id: 'w-inst' }, 'Installs (replication)'),
        installs instanceof Error ? problem(installs) : installs.length === 0 ? h('p', { class: 'muted' }, 'No installs.')
          : h('ul', { class: 'jobs' }, installs.map((i) => h('li', { 'data-mac': i.mac },
            h('strong', {}, i.mac), ` ${i.state} · ${i.phase} · started ${ago(i.started)}`,
            bar(i.done_bytes, i.total_bytes, `install ${i.mac}`),
            h('small', {}, eta(i, i.started), i.message ? ` · ${i.message}` : ''),
            session.write ? h('button', { type: 'button', class: 'danger small', 'data-write': '', onclick: () => forget(i.mac) }, 'Forget') : null)))),
      h('section', { class: 'card', 'aria-labelledby': 'w-clone' }, h('h2', { id: 'w-clone' }, 'Captures and deploys'),
        jobs instanceof Error ? problem(jobs) : jobs.length === 0 ? h('p', { class: 'muted' }, 'No clone jobs.')
          : h('ul', { class: 'jobs' }, jobs.map((j) => h('li', { 'data-id': j.id },
            h('strong', {}, `${j.action} ${j.system || j.mac}`), ` ${j.state} · ${j.phase} · ${j.image || ''}`,
            bar(j.done_bytes, j.total_bytes, `${j.action} ${j.system || j.mac}`),
            h('small', {}, eta(j, j.created), j.message ? ` · ${j.message}` : ''),
            session.write && !['done', 'failed', 'cancelled'].includes(j.state)
              ? h('button', { type: 'button', class: 'danger small cancel-job', 'data-write': '', 'aria-label': `Cancel job ${j.id}`, onclick: () => cancel(j) }, 'Cancel') : null)))));
  }

  async function forget(mac) {
    if (!await confirmAction(`Forget the install record of ${mac}?`, 'Forget')) return;
    try { await api('DELETE', `/api/v1/installs/${encodeURIComponent(mac)}`); flash(`Forgot ${mac}`); draw(); } catch (e) { flash(e.message, 'bad'); }
  }
  async function cancel(j) {
    const reason = await confirmAction(`Cancel ${j.action} of ${j.system || j.mac}? The system goes back to booting from its disk.`, 'Cancel job', true);
    if (!reason) return;
    try {
      await api('DELETE', `/api/v1/clone/jobs/${encodeURIComponent(j.id)}?reason=${encodeURIComponent(reason)}`);
      flash(`Cancelled ${j.id}: ${reason}`);
      draw();
    } catch (e) { flash(e.message, 'bad'); }
  }

  await draw();
  const start = await api('GET', '/api/v1/events?order=newest&limit=1').catch(() => ({ next: 0 }));
  let pending = null;
  const stop = follow(`/api/v1/events?after=${start.next}`, (e) => {
    if (!/^(install|clone|capture|deploy|replica|repo|release)/.test(e.kind)) return;
    if (!pending) pending = setTimeout(() => { pending = null; draw(); }, 300);
  }, (s) => { liveState.textContent = s === 'live' ? '● following progress live' : s; });
  return () => { stop(); clearTimeout(pending); };
}
