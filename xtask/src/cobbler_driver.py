"""Drive Cobbler 3.3.10 for `cargo xtask bench inventory` (see peers.md).

Usage: python cobbler_driver.py SCRATCH N
Sets up /etc/cobbler, /var/lib/cobbler, /var/log/cobbler from the wheel,
runs `cobblerd -F` on 127.0.0.1:25151, creates a distro, a profile and N
systems over XML-RPC, syncs, edits kernel_options on all and syncs, times
get_systems() and one autoinstall render, and prints one JSON line.
"""
import hashlib, json, os, shutil, site, subprocess, sys, time, xmlrpc.client

scratch, n = sys.argv[1], int(sys.argv[2])
# Clients at once (threads, each its own XML-RPC connection and login),
# as many as the appliance side of the bench uses.
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 1
sp = site.getsitepackages()[0]
venv_bin = os.path.dirname(sys.executable)

for d in ("/etc/cobbler", "/var/lib/cobbler", "/var/log/cobbler"):
    shutil.rmtree(d, ignore_errors=True)
shutil.copytree(os.path.join(sp, "etc/cobbler"), "/etc/cobbler")
shutil.copytree(os.path.join(sp, "var/lib/cobbler"), "/var/lib/cobbler")
for c in ("distros", "profiles", "systems", "repos", "images", "menus", "mgmtclasses", "packages", "files"):
    os.makedirs("/var/lib/cobbler/collections/" + c, exist_ok=True)
for d in ("/var/log/cobbler/tasks", "/var/log/cobbler/anamon", "/var/log/cobbler/kicklog", "/var/log/cobbler/syslog"):
    os.makedirs(d, exist_ok=True)
shutil.rmtree(scratch, ignore_errors=True)
tftp, web = os.path.join(scratch, "tftpboot"), os.path.join(scratch, "www")
for d in (tftp, web, os.path.join(web, "links"), os.path.join(web, "misc"), os.path.join(web, "distro_mirror"), os.path.join(web, "pub"), os.path.join(web, "rendered"), os.path.join(web, "images"), os.path.join(web, "localmirror"), os.path.join(web, "repo_mirror"), os.path.join(web, "svc")):
    os.makedirs(d, exist_ok=True)

import yaml
settings_path = "/etc/cobbler/settings.yaml"
s = yaml.safe_load(open(settings_path))
s.update({
    "manage_dhcp": False, "manage_dhcp_v4": False, "manage_dhcp_v6": False,
    "manage_dns": False, "manage_rsync": False, "manage_tftpd": True,
    "tftpboot_location": tftp, "webdir": web,
    "server": "127.0.0.1", "next_server_v4": "127.0.0.1",
    "auto_migrate_settings": False,
})
yaml.safe_dump(s, open(settings_path, "w"))
open("/etc/cobbler/users.digest", "w").write(
    "cobbler:Cobbler:%s\n" % hashlib.sha3_512(b"cobbler").hexdigest())
if not os.path.exists("/etc/cobbler/version"):
    open("/etc/cobbler/version", "w").write("[cobbler]\nversion=3.3.10\n")

kernel, initrd = os.path.join(scratch, "vmlinuz"), os.path.join(scratch, "initrd.img")
open(kernel, "wb").write(b"k" * 4096)
open(initrd, "wb").write(b"i" * 4096)

log = open(os.path.join(scratch, "cobblerd.log"), "w")
daemon = subprocess.Popen([os.path.join(venv_bin, "cobblerd"), "-F"], stdout=log, stderr=subprocess.STDOUT)
try:
    srv = xmlrpc.client.ServerProxy("http://127.0.0.1:25151", allow_none=True)
    deadline = time.time() + 120
    while True:
        try:
            srv.version()
            break
        except Exception:
            if daemon.poll() is not None or time.time() > deadline:
                raise SystemExit("cobblerd did not start; see %s" % log.name)
            time.sleep(0.5)
    tok = srv.login("cobbler", "cobbler")
    did = srv.new_distro(tok)
    for k, v in (("name", "d"), ("kernel", kernel), ("initrd", initrd), ("arch", "x86_64"),
                 ("breed", "redhat"), ("os_version", "rhel9"), ("autoinstall_meta", "tree=http://127.0.0.1/tree")):
        srv.modify_distro(did, k, v, tok)
    srv.save_distro(did, tok)
    pid = srv.new_profile(tok)
    srv.modify_profile(pid, "name", "p", tok)
    srv.modify_profile(pid, "distro", "d", tok)
    srv.modify_profile(pid, "autoinstall", "sample.ks", tok)
    srv.save_profile(pid, tok)

    def mac(i):
        return "52:54:00:%02x:%02x:%02x" % (i >> 16, (i >> 8) & 0xff, i & 0xff)

    import threading
    def fleet(work):
        # Each client: its own connection and token, every clients-th item.
        errors = []
        def client(w):
            try:
                s = xmlrpc.client.ServerProxy("http://127.0.0.1:25151", allow_none=True)
                tk = s.login("cobbler", "cobbler")
                for i in range(w, n, clients):
                    work(s, tk, i)
            except Exception as e:
                errors.append(e)
        ths = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        if errors:
            raise errors[0]

    def create_one(srv, tok, i):
        sid = srv.new_system(tok)
        srv.modify_system(sid, "name", "s%05d" % i, tok)
        srv.modify_system(sid, "profile", "p", tok)
        srv.modify_system(sid, "modify_interface", {
            "macaddress-eth0": mac(i), "ipaddress-eth0": "10.%d.%d.%d" % (1 + (i >> 16), (i >> 8) & 0xff, i & 0xff)}, tok)
        srv.save_system(sid, tok)

    def edit_one(srv, tok, i):
        h = srv.get_system_handle("s%05d" % i, tok)
        srv.modify_system(h, "kernel_options", "console=ttyS0 edited=1", tok)
        srv.save_system(h, tok)

    t = time.time()
    fleet(create_one)
    create = time.time() - t
    t = time.time()
    srv.sync(tok)
    sync = time.time() - t
    t = time.time()
    fleet(edit_one)
    srv.sync(tok)
    edit_sync = time.time() - t
    # The boot file Cobbler wrote for the last system must carry the edit.
    pxe = os.path.join(tftp, "grub", "system", mac(n - 1))
    edited = os.path.exists(pxe) and "edited=1" in open(pxe).read()
    t = time.time()
    systems = srv.get_systems()
    get_systems = time.time() - t

    # One autoinstall render through Cobbler's own WSGI service.
    import importlib.util
    spec = importlib.util.spec_from_file_location("cobbler_svc_wsgi", os.path.join(sp, "var/www/cobbler/svc/services.py"))
    services = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services)
    body = []
    environ = {"REQUEST_URI": "/cblr/svc/op/autoinstall/system/s00000", "PATH_INFO": "/cblr/svc/op/autoinstall/system/s00000",
               "REQUEST_METHOD": "GET", "REMOTE_ADDR": "127.0.0.1", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "wsgi.input": None, "wsgi.url_scheme": "http"}
    t = time.time()
    out = services.application(environ, lambda status, headers: body.append(status))
    text = b"".join(x if isinstance(x, bytes) else x.encode() for x in out)
    render = time.time() - t
    sys.stderr.write(text[:300].decode(errors="replace") + "\n")
    print(json.dumps({"clients": clients, "create": create, "sync": sync, "edit_sync": edit_sync, "get_systems": get_systems,
                      "systems": len(systems), "render": render, "render_status": body[0] if body else "",
                      "render_bytes": len(text), "boot_file_edited": edited}))
finally:
    daemon.terminate()
    daemon.wait()
