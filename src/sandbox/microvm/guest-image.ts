/**
 * Builds what a microvm sandbox boots: a Linux kernel (Debian's cloud kernel, unpacked from its
 * .deb into the cache rather than installed on the host), and an initramfs holding busybox, the
 * virtio modules, a tiny `/init` and the guest agent (`../agent/berth-agent.c`, compiled with the
 * host's gcc). Everything is cached under the Berth cache directory, keyed by its inputs, so the
 * build runs once per host and again only when the kernel, busybox or the agent changes.
 *
 * Run it ahead of time (e.g. in CI or a machine image) with
 * `npx tsx src/sandbox/microvm/guest-image.ts [cache directory]`; the driver otherwise runs it
 * on demand from `checkAvailability`.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { BerthError } from '../../errors.js';

const run = promisify(execFile);

/** The guest kernel's meta-package; its dependency names the versioned package to download. */
const KERNEL_META_PACKAGE = 'linux-image-cloud-amd64';
/** Modules the guest needs, in load order (the cloud kernel builds virtio as modules). */
const GUEST_MODULES = [
  'drivers/virtio/virtio_ring.ko',
  'drivers/virtio/virtio.ko',
  'drivers/virtio/virtio_mmio.ko',
  'drivers/block/virtio_blk.ko',
  'drivers/char/virtio_console.ko',
];
/** Bump when the initramfs layout changes, so cached images are rebuilt. */
const IMAGE_FORMAT = 4;

/** The uid commands run as in the guest (the agent hard-codes the same number). */
export const GUEST_SANDBOX_UID = 1000;
export const GUEST_HOME = '/home/sandbox';
export const GUEST_PATH = '/bin:/sbin:/usr/bin:/usr/sbin';

/** Where the microvm driver caches kernels, guest images and templates by default. */
export function defaultMicrovmCacheDirectory(): string {
  return join(homedir(), '.cache', 'berth', 'microvm');
}

/** A bootable guest: kernel and initramfs paths, and a key naming this exact build. */
export interface GuestImage {
  kernelPath: string;
  initramfsPath: string;
  /** Changes whenever any input of the guest changes (templates are keyed by it). */
  key: string;
}

export interface GuestImageOptions {
  cacheDirectory: string;
  /** Progress lines for a human ("downloading the guest kernel ..."). */
  onProgress?: (message: string) => void;
  /** Path to a static busybox (default /bin/busybox from `busybox-static`). */
  busyboxPath?: string;
}

/** The init script: mounts, modules, the sandbox user's directories, cgroups, then the agent. */
const INIT_SCRIPT = `#!/bin/busybox sh
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777,size=50% tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0700,uid=${GUEST_SANDBOX_UID},gid=${GUEST_SANDBOX_UID},size=25% tmpfs ${GUEST_HOME}
for module in ${GUEST_MODULES.map((path) => `/lib/modules/${path.split('/').pop()}`).join(' ')}; do
  insmod "$module" || echo "berth init: cannot load $module" >&2
done
# One cgroup for everything commands run (pids limit, per-command kill).
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
echo "+pids +memory +cpu" > /sys/fs/cgroup/cgroup.subtree_control
mkdir -p /sys/fs/cgroup/sandbox
echo "+pids +memory +cpu" > /sys/fs/cgroup/sandbox/cgroup.subtree_control
hostname sandbox
ip link set lo up 2>/dev/null
# The one way out: 127.0.0.1:3128 carried over the berth.egress port to the session's egress
# proxy (root here, so the sandbox user can neither stop nor trace it). /run/berth holds the
# proxy's trust files, which the host writes before commands (as the sandbox user).
mkdir -p /run/berth
chown ${GUEST_SANDBOX_UID}:${GUEST_SANDBOX_UID} /run/berth
/sbin/berth-agent --egress-port berth.egress 3128 </dev/null &
exec /sbin/berth-agent
`;

const ETC_FILES: Record<string, string> = {
  'etc/passwd': `root:x:0:0:root:/root:/bin/sh\nsandbox:x:${GUEST_SANDBOX_UID}:${GUEST_SANDBOX_UID}:sandbox:${GUEST_HOME}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n`,
  'etc/group': `root:x:0:\nsandbox:x:${GUEST_SANDBOX_UID}:\nnogroup:x:65534:\n`,
  'etc/hosts': '127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n',
  'etc/hostname': 'sandbox\n',
};

/** One entry of a cpio archive. */
interface ArchiveEntry {
  path: string;
  mode: number;
  uid?: number;
  data?: Buffer;
}

/** Writes a "newc" cpio archive, the format the kernel unpacks into its initramfs. */
export function cpioArchive(entries: readonly ArchiveEntry[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (length: number) => Buffer.alloc((4 - (length % 4)) % 4);
  const header = (inode: number, entry: ArchiveEntry, name: string, size: number) => {
    const fields = [inode, entry.mode, entry.uid ?? 0, entry.uid ?? 0, 1, 0, size, 0, 0, 0, 0];
    const text = `070701${fields.map((value) => value.toString(16).padStart(8, '0')).join('')}${(
      Buffer.byteLength(name) + 1
    )
      .toString(16)
      .padStart(8, '0')}00000000`;
    const head = Buffer.from(`${text}${name}\0`, 'utf8');
    parts.push(head, pad(head.length));
  };
  entries.forEach((entry, index) => {
    const data = entry.data ?? Buffer.alloc(0);
    header(index + 1, entry, entry.path, data.length);
    parts.push(data, pad(data.length));
  });
  header(0, { path: 'TRAILER!!!', mode: 0 }, 'TRAILER!!!', 0);
  return Buffer.concat(parts);
}

const sha256 = (...inputs: Array<string | Buffer>) => {
  const hash = createHash('sha256');
  for (const input of inputs) hash.update(input);
  return hash.digest('hex');
};

/** Writes a file atomically (temp name, then rename), so a crash never leaves half a cache entry. */
async function writeAtomically(path: string, data: Buffer | string): Promise<void> {
  const temporary = `${path}.${process.pid}.tmp`;
  await writeFile(temporary, data);
  await rename(temporary, path);
}

/**
 * The unpacked cloud kernel in the cache: the newest already there, else the version the
 * meta-package depends on, fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
 */
async function ensureKernel(options: GuestImageOptions): Promise<{ directory: string; release: string }> {
  const kernels = join(options.cacheDirectory, 'kernel');
  await mkdir(kernels, { recursive: true });
  const cached = (await readdir(kernels)).filter((name) => /^linux-image-.*-cloud-amd64$/.test(name)).sort();
  let packageName = cached.at(-1);
  if (!packageName) {
    options.onProgress?.(`looking up the guest kernel package (${KERNEL_META_PACKAGE})`);
    const depends = await run('apt-cache', ['depends', KERNEL_META_PACKAGE]).catch((error: unknown) => {
      throw new BerthError(
        'sandbox_unavailable',
        `cannot find the guest kernel package ${KERNEL_META_PACKAGE} with apt-cache (a Debian host with apt sources is needed): ${String(error)}`,
        { cause: error },
      );
    });
    packageName = /Depends: (linux-image-\S+-cloud-amd64)\b/.exec(depends.stdout)?.[1];
    if (!packageName) {
      throw new BerthError('sandbox_unavailable', `${KERNEL_META_PACKAGE} names no versioned kernel package`);
    }
    const scratch = await mkdtemp(join(kernels, '.download-'));
    try {
      options.onProgress?.(`downloading ${packageName} (about 27 MB; not installed on the host)`);
      await run('apt-get', ['download', packageName], { cwd: scratch }).catch((error: unknown) => {
        throw new BerthError(
          'sandbox_unavailable',
          `cannot download ${packageName}: ${String(error)}; run \`apt-get update\` first`,
          { cause: error },
        );
      });
      const deb = (await readdir(scratch)).find((name) => name.endsWith('.deb'));
      if (!deb) throw new BerthError('sandbox_unavailable', `apt-get download ${packageName} saved no .deb`);
      options.onProgress?.(`unpacking ${deb}`);
      await run('dpkg-deb', ['-x', join(scratch, deb), join(scratch, 'unpacked')]);
      await rename(join(scratch, 'unpacked'), join(kernels, packageName));
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
  }
  const directory = join(kernels, packageName);
  const release = packageName.replace(/^linux-image-/, '');
  return { directory, release };
}

/** Compiles the guest agent statically (cached by the hash of its source). */
async function ensureAgent(options: GuestImageOptions): Promise<Buffer> {
  const sourcePath = fileURLToPath(new URL('../agent/berth-agent.c', import.meta.url));
  const source = await readFile(sourcePath);
  const output = join(options.cacheDirectory, 'agent', `berth-agent-${sha256(source).slice(0, 16)}`);
  if (!existsSync(output)) {
    await mkdir(join(options.cacheDirectory, 'agent'), { recursive: true });
    options.onProgress?.('compiling the guest agent (gcc -static -Os)');
    const temporary = `${output}.${process.pid}.tmp`;
    await run('gcc', ['-static', '-Os', '-s', '-Wall', '-o', temporary, sourcePath]).catch(
      (error: unknown) => {
        throw new BerthError(
          'sandbox_unavailable',
          `cannot compile the microvm guest agent; install gcc and libc6-dev (\`apt-get install gcc libc6-dev\`): ${String((error as { stderr?: string }).stderr ?? error)}`,
          { cause: error },
        );
      },
    );
    await rename(temporary, output);
  }
  return readFile(output);
}

/**
 * Returns the guest kernel and initramfs, building whatever is not cached yet. Throws a
 * `sandbox_unavailable` BerthError saying what to install when a step cannot run.
 */
export async function ensureGuestImage(options: GuestImageOptions): Promise<GuestImage> {
  const busyboxPath = options.busyboxPath ?? '/bin/busybox';
  const busybox = await readFile(busyboxPath).catch(() => {
    throw new BerthError(
      'sandbox_unavailable',
      `no static busybox at ${busyboxPath}; install it with \`apt-get install busybox-static\``,
    );
  });
  const kernel = await ensureKernel(options);
  const agent = await ensureAgent(options);
  const kernelPath = join(kernel.directory, 'boot', `vmlinuz-${kernel.release}`);
  if (!existsSync(kernelPath)) throw new BerthError('sandbox_unavailable', `no kernel at ${kernelPath}`);
  const key = sha256(String(IMAGE_FORMAT), kernel.release, sha256(busybox), sha256(agent), INIT_SCRIPT).slice(
    0,
    16,
  );
  const imageDirectory = join(options.cacheDirectory, 'images', key);
  const initramfsPath = join(imageDirectory, 'initramfs.gz');
  if (existsSync(initramfsPath)) return { kernelPath, initramfsPath, key };

  options.onProgress?.(`assembling the guest initramfs (${key})`);
  await mkdir(imageDirectory, { recursive: true });
  const { stdout: applets } = await run(busyboxPath, ['--list-full']);
  const directory = (path: string, mode = 0o755, uid = 0): ArchiveEntry => ({
    path,
    mode: 0o040000 | mode,
    uid,
  });
  const file = (path: string, data: Buffer | string, mode = 0o644): ArchiveEntry => ({
    path,
    mode: 0o100000 | mode,
    data: Buffer.from(data),
  });
  const symlink = (path: string, target: string): ArchiveEntry => ({
    path,
    mode: 0o120777,
    data: Buffer.from(target),
  });
  const entries: ArchiveEntry[] = [
    // Without an entry for it, the kernel leaves the root directory world-writable (1777).
    directory('.'),
    ...['bin', 'sbin', 'usr', 'etc', 'dev', 'proc', 'sys', 'run', 'root', 'lib', 'lib/modules'].map((path) =>
      directory(path, path === 'root' ? 0o700 : 0o755),
    ),
    directory('tmp', 0o1777),
    directory('home'),
    directory(GUEST_HOME.slice(1), 0o700, GUEST_SANDBOX_UID),
    directory('workspace', 0o755, GUEST_SANDBOX_UID),
    symlink('usr/bin', '../bin'),
    symlink('usr/sbin', '../sbin'),
    file('bin/busybox', busybox, 0o755),
    file('sbin/berth-agent', agent, 0o700),
    file('init', INIT_SCRIPT, 0o755),
    ...Object.entries(ETC_FILES).map(([path, text]) => file(path, text)),
  ];
  const seen = new Set(entries.map((entry) => entry.path));
  for (const applet of applets.split('\n')) {
    // `--list-full` names each applet's install path (bin/sh, usr/bin/head ...); all go in /bin or /sbin.
    const name = applet.split('/').pop();
    if (!name || name === 'busybox') continue;
    const path = `${applet.includes('sbin/') ? 'sbin' : 'bin'}/${name}`;
    if (seen.has(path) || seen.has(`bin/${name}`)) continue;
    seen.add(path);
    entries.push(symlink(path, '/bin/busybox'));
  }
  for (const module of GUEST_MODULES) {
    const data = await readFile(join(kernel.directory, 'lib', 'modules', kernel.release, 'kernel', module));
    entries.push(file(`lib/modules/${module.split('/').pop()}`, data));
  }
  await writeAtomically(initramfsPath, gzipSync(cpioArchive(entries), { level: 6 }));
  return { kernelPath, initramfsPath, key };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const cacheDirectory = process.argv[2] ?? defaultMicrovmCacheDirectory();
  const image = await ensureGuestImage({
    cacheDirectory,
    onProgress: (message) => console.error(`microvm guest: ${message}`),
  });
  console.log(JSON.stringify(image, null, 2));
}
