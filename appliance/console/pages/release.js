// Release: the running release (digest and signed manifest), a rebuild
// from the bundle with its identical/different verdict, downloads (image,
// ISO when the manifest lists one, a sync bundle) and flashing onto a
// local disk. Every call is a documented route: GET /api/v1/release,
// /release/manifest, /release/prepare, /disks, /flash; POST
// /release/rebuild, /release/prepare, /flash; GET /sync/export.

import { api, text, download } from '../api.js';
import { session } from '../app.js';
import { h, put, problem, flash, confirmAction, field, bytes, duration, short } from '../ui.js';

function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v, id]) => [h('dt', {}, k), h('dd', id ? { id } : {}, v)]));
}

function code(d) {
  return d ? h('code', { title: d }, short(d)) : '—';
}

/** The verdict of a rebuild report, as words and a class. */
function verdict(r) {
  return r.identical
    ? h('p', { class: 'verdict good', id: 'rebuild-verdict' }, `Identical: the rebuilt release ${short(r.rebuilt_release)} is the running one, bit for bit (disk ${short(r.disk)}, ${duration(r.seconds || 0)}).`)
    : h('p', { class: 'verdict bad', id: 'rebuild-verdict' }, `DIFFERENT: the rebuilt release ${short(r.rebuilt_release)} is not the running ${short(r.booted_release)}.`);
}

/** Why the CLI would refuse a disk (the server refuses the same). */
function refusal(d, imageSize) {
  if (d.boot_disk) return 'the disk this appliance runs from';
  if (d.mounted) return 'mounted';
  if (imageSize && d.size < imageSize) return `smaller than the image (${bytes(imageSize)})`;
  return '';
}

export async function render(main) {
  const [rel, manifestText, prep] = await Promise.all([
    api('GET', '/api/v1/release'),
    text('/api/v1/release/manifest').catch((e) => e),
    api('GET', '/api/v1/release/prepare').catch((e) => e),
  ]);
  let manifest = null;
  if (typeof manifestText === 'string') {
    try { manifest = JSON.parse(manifestText); } catch (_) { manifest = null; }
  }
  const image = manifest && manifest.image ? `${manifest.image.name} ${manifest.image.version}` : '—';
  const disk = manifest && manifest.disk;
  const outputs = manifest && manifest.outputs ? Object.entries(manifest.outputs) : [];
  const iso = outputs.find(([k, o]) => k === 'iso' || /\.iso$/.test(o.file || ''));

  // The running release.
  const head = h('section', { class: 'card', 'aria-labelledby': 'r-run' },
    h('h2', { id: 'r-run' }, 'Running release'),
    rel.release ? dl([
      ['Release', h('code', { id: 'release-digest' }, rel.release)],
      ['Image', image],
      ['Builder', manifest ? manifest.builder : '—'],
      ['Epoch', manifest ? new Date(manifest.epoch * 1000).toISOString().slice(0, 10) : '—'],
      disk ? ['Disk', `${disk.file}, ${bytes(disk.size)}, ${disk.partitions.length} partitions`] : null,
    ]) : h('p', { class: 'muted', id: 'release-digest' }, 'This node has no release manifest (it was not booted from an appliance image).'));

  // The manifest: outputs and inputs, each with its digest.
  const inputs = manifest ? Object.entries(manifest.inputs || {}) : [];
  const fileTable = (id, caption, rows) => h('div', { class: 'scroll' }, h('table', { id },
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, ['Name', 'Kind', 'Size', 'Digest'].map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows)));
  const man = manifest ? h('section', { class: 'card', 'aria-labelledby': 'r-man' },
    h('h2', { id: 'r-man' }, 'Signed manifest'),
    fileTable('manifest-files', `${outputs.length} outputs`,
      outputs.map(([k, o]) => h('tr', {}, h('td', {}, `${k} (${o.file})`), h('td', {}, 'output'), h('td', {}, bytes(o.size)), h('td', {}, code(o.digest))))),
    h('details', { id: 'manifest-inputs' }, h('summary', {}, `${inputs.length} inputs it was built from`),
      fileTable('manifest-input-files', 'Inputs',
        inputs.map(([k, i]) => h('tr', {}, h('td', {}, k), h('td', {}, i.kind), h('td', {}, bytes(i.size)), h('td', {}, code(i.digest)))))),
    h('p', {}, h('a', { href: '/api/v1/release/manifest', download: 'manifest.json', id: 'dl-manifest' }, 'manifest.json'), ' · ',
      h('a', { href: '/api/v1/release/signature', download: 'manifest.json.sig', id: 'dl-signature' }, 'manifest.json.sig'))) : null;

  // Rebuild: progress (estimated from the last rebuild's time) and verdict.
  const rebuildOut = h('div', { id: 'rebuild-out', 'aria-live': 'polite' },
    rel.cached ? verdict(rel.cached) : h('p', { class: 'muted', id: 'rebuild-verdict' }, 'No verified rebuild on this node yet.'));
  const last = rel.cached ? rel.cached.seconds : 0;
  async function rebuild(btn) {
    if (!await confirmAction('Rebuild this appliance\'s image from its bundle, offline? It takes a few minutes of CPU.', 'Rebuild')) return;
    btn.disabled = true;
    const bar = h('progress', { max: '100', id: 'rebuild-progress', 'aria-label': 'rebuild progress' });
    const note = h('span', { id: 'rebuild-elapsed' }, 'starting');
    put(rebuildOut, h('div', { class: 'bar' }, bar, note));
    const t0 = performance.now();
    const tick = setInterval(() => {
      const s = (performance.now() - t0) / 1000;
      if (last) bar.value = Math.min(99, Math.floor((s * 100) / last));
      note.textContent = `rebuilding · ${duration(s)}${last ? ` of about ${duration(last)} (the last rebuild's time)` : ''}`;
    }, 250);
    try {
      const r = await api('POST', '/api/v1/release/rebuild');
      clearInterval(tick);
      put(rebuildOut, verdict(r));
      flash(r.identical ? 'Rebuild identical' : 'Rebuild DIFFERENT', r.identical ? 'ok' : 'bad');
    } catch (e) {
      clearInterval(tick);
      put(rebuildOut, problem(e));
    } finally {
      btn.disabled = false;
    }
  }
  const rebuildCard = h('section', { class: 'card', 'aria-labelledby': 'r-reb' },
    h('h2', { id: 'r-reb' }, 'Rebuild'),
    h('p', {}, 'Builds the image again from the bundle on the data partition, with no network, and compares the release manifest with the running one.'),
    rebuildOut,
    session.write && rel.release ? h('button', { type: 'button', class: 'primary', id: 'rebuild', 'data-write': '', onclick: (ev) => rebuild(ev.currentTarget) }, 'Rebuild now') : null);

  // Downloads.
  const prepOut = h('span', { id: 'prepare-state', 'aria-live': 'polite' });
  const imageLink = h('li', { id: 'dl-image-item' });
  function drawImage(p) {
    const st = p && p.state;
    if (st === 'ready') {
      put(imageLink, h('a', { href: '/api/v1/release/image', download: disk ? disk.file : 'appliance.img', id: 'dl-image' }, `Disk image (${disk ? disk.file : 'appliance.img'}, ${bytes(disk ? disk.size : p.data_bytes)})`),
        h('small', {}, ` · sha256 ${short(p.disk)}; write it with `, h('code', {}, 'appliance flash'), ' or bmaptool (', h('a', { href: '/api/v1/release/bmap', download: 'appliance.img.bmap' }, 'block map'), ')'));
      return;
    }
    put(imageLink, 'Disk image: ',
      st === 'preparing' ? h('span', { id: 'prepare-state' }, 'being prepared (a verified rebuild)…')
        : st === 'failed' ? h('span', { class: 'error', id: 'prepare-state' }, `preparing failed: ${p.error || p.message || ''}`)
          : h('span', { id: 'prepare-state' }, 'not prepared yet'),
      session.write && st !== 'preparing' && rel.release
        ? [' ', h('button', { type: 'button', class: 'small', id: 'prepare', 'data-write': '', onclick: prepare }, 'Prepare the download')] : null);
  }
  let poll = null;
  async function prepare() {
    try {
      drawImage(await api('POST', '/api/v1/release/prepare'));
      watch();
    } catch (e) { flash(e.message, 'bad'); }
  }
  function watch() {
    clearTimeout(poll);
    poll = setTimeout(async () => {
      try {
        const p = await api('GET', '/api/v1/release/prepare');
        drawImage(p);
        if (p.state === 'preparing') watch();
      } catch (e) { flash(e.message, 'bad'); }
    }, 1000);
  }
  drawImage(prep instanceof Error ? null : prep);
  if (!(prep instanceof Error) && prep.state === 'preparing') watch();

  async function bundle(btn) {
    btn.disabled = true;
    try {
      const n = await download('/api/v1/sync/export', 'changes.bundle');
      flash(`Downloaded changes.bundle (${bytes(n)})`);
    } catch (e) { flash(e.message, 'bad'); } finally { btn.disabled = false; }
  }
  const downloads = h('section', { class: 'card', 'aria-labelledby': 'r-dl' },
    h('h2', { id: 'r-dl' }, 'Downloads'),
    h('ul', { class: 'downloads' },
      imageLink,
      iso ? h('li', { id: 'dl-iso-item' }, `ISO image: ${iso[1].file}, ${bytes(iso[1].size)}, sha256 ${short(iso[1].digest)} (listed in the manifest; no route of this version serves it)`) : null,
      h('li', {}, session.write
        ? h('button', { type: 'button', class: 'small', id: 'dl-bundle', 'data-write': '', onclick: (ev) => bundle(ev.currentTarget) }, 'Download a sync bundle')
        : 'Sync bundle: an operator token can download one',
      h('small', {}, ' · every change this node holds, for an air gap (', h('code', {}, 'appliance sync import'), ' on the other side)'))));

  // Flash onto a local disk (admin), refused like the CLI refuses.
  const flashCard = h('section', { class: 'card', 'aria-labelledby': 'r-flash' }, h('h2', { id: 'r-flash' }, 'Flash to a local disk'));
  if (session.scope === 'admin') await drawFlash(flashCard, rel, disk);
  else put(flashCard, h('h2', { id: 'r-flash' }, 'Flash to a local disk'), h('p', { class: 'muted' }, 'Flashing needs an admin token.'));

  put(main, h('h1', {}, 'Release'), head, rebuildCard, downloads, man, flashCard);
  return () => clearTimeout(poll);
}

async function drawFlash(card, rel, disk) {
  const [disks, status] = await Promise.all([
    api('GET', '/api/v1/disks').then((p) => p.items || p).catch((e) => e),
    api('GET', '/api/v1/flash').catch((e) => e),
  ]);
  const size = disk ? disk.size : 0;
  const out = h('div', { id: 'flash-out', 'aria-live': 'polite' });
  const sel = h('input', { id: 'flash-device', list: 'disk-list', autocomplete: 'off', spellcheck: 'false', placeholder: '/dev/sdX' });
  const list = h('datalist', { id: 'disk-list' },
    disks instanceof Error ? [] : disks.filter((d) => !refusal(d, size)).map((d) => h('option', { value: d.path })));
  const table = disks instanceof Error ? problem(disks) : disks.length === 0 ? h('p', { class: 'muted' }, 'No local disks found.')
    : h('div', { class: 'scroll' }, h('table', { id: 'disks' },
      h('caption', {}, 'Local disks'),
      h('thead', {}, h('tr', {}, ['Disk', 'Size', 'Model', 'Removable', 'May be flashed'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, disks.map((d) => {
        const why = refusal(d, size);
        return h('tr', { 'data-path': d.path, 'data-refused': why || null },
          h('td', {}, h('code', {}, d.path)), h('td', {}, bytes(d.size)), h('td', {}, d.model || '—'),
          h('td', {}, d.removable ? 'yes' : 'no'), h('td', {}, why ? `no: ${why}` : 'yes'));
      }))));
  let poll = null;
  function drawStatus(s) {
    if (!s || s.state === 'idle') { put(out); return; }
    const p = s.progress || {};
    const total = p.total || 0;
    const done = p.done || 0;
    put(out, h('p', { id: 'flash-state', class: s.state === 'failed' ? 'error' : null }, `${s.state}: ${s.device || ''}${p.phase && s.state === 'running' ? ` · ${p.phase}` : ''}${s.error ? ` · ${s.error}` : ''}`),
      s.state === 'running' && total ? h('div', { class: 'bar' }, h('progress', { max: '100', value: String(Math.floor((done * 100) / total)), 'aria-label': 'flash progress' }), h('span', {}, `${bytes(done)} of ${bytes(total)}`)) : null,
      s.state === 'done' && s.report ? h('p', {}, `Written and verified: ${bytes(s.report.image_size)} onto ${s.device}.`) : null);
    if (s.state === 'running') { clearTimeout(poll); poll = setTimeout(async () => drawStatus(await api('GET', '/api/v1/flash').catch(() => null)), 1000); }
  }
  async function go(ev) {
    ev.preventDefault();
    const dev = sel.value.trim();
    if (!dev.startsWith('/')) { put(out, problem(new Error('Name the disk (or image file) to write by its absolute path, e.g. /dev/sdb.'))); return; }
    const d = disks instanceof Error ? null : disks.find((x) => x.path === dev);
    if (!await confirmAction(`Erase ${dev}${d ? ` (${bytes(d.size)}${d.model ? `, ${d.model}` : ''})` : ''} and write the appliance image onto it? Everything on it is lost.`, 'Erase and flash')) return;
    try {
      // The server writes its own verified rebuild (no path from here).
      drawStatus(await api('POST', '/api/v1/flash', { device: dev }));
      flash(`Flashing ${dev}`);
    } catch (e) {
      put(out, problem(e));
    }
  }
  put(card, h('h2', { id: 'r-flash' }, 'Flash to a local disk'),
    h('p', {}, 'Writes the verified rebuilt image (first MiB last). Refused, as by ', h('code', {}, 'appliance flash'), ': the disk this appliance runs from, a mounted disk, a disk smaller than the image.'),
    table,
    h('form', { id: 'flash-form', class: 'row', onsubmit: go },
      field('Target disk or image file', sel), list,
      h('button', { type: 'submit', class: 'danger', id: 'flash-go', 'data-write': '' }, 'Flash…')),
    out);
  drawStatus(status instanceof Error ? null : status);
}
