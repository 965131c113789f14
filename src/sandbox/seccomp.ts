/**
 * The seccomp filter every sandboxed process runs under, generated here as a classic BPF
 * program (no libseccomp): a short list of system calls no agent needs, which are either
 * kernel attack surface (bpf, io_uring, userfaultfd, keyctl...) or ways out of the sandbox
 * (mount, new namespaces, ptrace of a neighbour, open_by_handle_at...). A blocked call fails
 * with EPERM, so tools print a clear "Operation not permitted" instead of dying. Everything
 * else is allowed: the namespaces, the cgroup and uid 1000 without capabilities do the rest.
 *
 * A process of any other ABI (i386 `int 0x80`, x32 on x86_64) is killed: syscall numbers mean
 * something else there, so the list above would not hold (the classic seccomp bypass).
 *
 * The bwrap driver installs the program with bwrap's `--seccomp FD` (raw bytes) on the sandbox's
 * agent; every command the agent forks inherits it.
 */

/** Architectures the filter knows syscall numbers for. */
export type SeccompArchitecture = 'x86_64' | 'aarch64';

/** `AUDIT_ARCH_*` values from linux/audit.h: what `seccomp_data.arch` holds for a native call. */
const AUDIT_ARCH: Record<SeccompArchitecture, number> = { x86_64: 0xc000003e, aarch64: 0xc00000b7 };

/** x86_64 marks x32-ABI calls with this bit in the syscall number. */
const X32_SYSCALL_BIT = 0x40000000;

/**
 * Namespace flags `clone` may not carry (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
 * NEWPID, NEWNET). The kernel reads only the low 32 bits of clone's flags.
 */
const CLONE_NAMESPACE_FLAGS =
  0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000;

const EPERM = 1;
const ENOSYS = 38;

/** Seccomp return actions (linux/seccomp.h). */
const RET = {
  killProcess: 0x80000000,
  errno: 0x00050000,
  allow: 0x7fff0000,
} as const;

/** A system call the filter refuses, with its number on each architecture (absent: no such call). */
export interface BlockedSyscall {
  name: string;
  x86_64?: number;
  aarch64?: number;
  /** Why an agent never needs it, for the documentation and the review. */
  reason: string;
}

/**
 * Refused with EPERM. Numbers come from the kernel's uapi headers (asm/unistd_64.h for x86_64,
 * asm-generic/unistd.h for aarch64); calls added since 5.1 share one number on every arch.
 */
export const BLOCKED_SYSCALLS: readonly BlockedSyscall[] = [
  // Reading or steering other processes.
  {
    name: 'ptrace',
    x86_64: 101,
    aarch64: 117,
    reason: 'debugging another process: read its memory, inject code',
  },
  { name: 'process_vm_readv', x86_64: 310, aarch64: 270, reason: 'reads another process memory' },
  { name: 'process_vm_writev', x86_64: 311, aarch64: 271, reason: 'writes another process memory' },
  { name: 'pidfd_getfd', x86_64: 438, aarch64: 438, reason: 'steals a file descriptor of another process' },
  // Changing the file-system view.
  { name: 'mount', x86_64: 165, aarch64: 40, reason: 'changes the sandbox mounts' },
  { name: 'umount2', x86_64: 166, aarch64: 39, reason: 'uncovers what the sandbox mounts hide' },
  { name: 'pivot_root', x86_64: 155, aarch64: 41, reason: 'changes the root mount' },
  { name: 'chroot', x86_64: 161, aarch64: 51, reason: 'chroot escapes need it' },
  { name: 'open_tree', x86_64: 428, aarch64: 428, reason: 'new mount API' },
  { name: 'move_mount', x86_64: 429, aarch64: 429, reason: 'new mount API' },
  { name: 'fsopen', x86_64: 430, aarch64: 430, reason: 'new mount API' },
  { name: 'fsconfig', x86_64: 431, aarch64: 431, reason: 'new mount API' },
  { name: 'fsmount', x86_64: 432, aarch64: 432, reason: 'new mount API' },
  { name: 'fspick', x86_64: 433, aarch64: 433, reason: 'new mount API' },
  { name: 'mount_setattr', x86_64: 442, aarch64: 442, reason: 'new mount API' },
  { name: 'open_tree_attr', x86_64: 467, aarch64: 467, reason: 'new mount API' },
  {
    name: 'open_by_handle_at',
    x86_64: 304,
    aarch64: 265,
    reason: 'opens files by inode handle, past every mount (the "shocker" escape)',
  },
  { name: 'name_to_handle_at', x86_64: 303, aarch64: 264, reason: 'the other half of open_by_handle_at' },
  // New namespaces (a user namespace hands out capabilities over a fresh kernel surface).
  { name: 'unshare', x86_64: 272, aarch64: 97, reason: 'new namespaces' },
  { name: 'setns', x86_64: 308, aarch64: 268, reason: 'joins other namespaces' },
  // The kernel's largest attack surfaces that ordinary programs do not use.
  { name: 'bpf', x86_64: 321, aarch64: 280, reason: 'eBPF programs and maps' },
  {
    name: 'perf_event_open',
    x86_64: 298,
    aarch64: 241,
    reason: 'performance counters: side channels and kernel bugs',
  },
  {
    name: 'userfaultfd',
    x86_64: 323,
    aarch64: 282,
    reason: 'stalls the kernel mid-copy: a staple of kernel exploits',
  },
  {
    name: 'io_uring_setup',
    x86_64: 425,
    aarch64: 425,
    reason: 'io_uring bypasses seccomp for the operations it runs; programs fall back to plain calls',
  },
  { name: 'io_uring_enter', x86_64: 426, aarch64: 426, reason: 'io_uring' },
  { name: 'io_uring_register', x86_64: 427, aarch64: 427, reason: 'io_uring' },
  { name: 'keyctl', x86_64: 250, aarch64: 219, reason: 'kernel keyrings are not namespaced' },
  { name: 'add_key', x86_64: 248, aarch64: 217, reason: 'kernel keyrings' },
  { name: 'request_key', x86_64: 249, aarch64: 218, reason: 'kernel keyrings' },
  // Administration of the host.
  { name: 'kexec_load', x86_64: 246, aarch64: 104, reason: 'boots another kernel' },
  { name: 'kexec_file_load', x86_64: 320, aarch64: 294, reason: 'boots another kernel' },
  { name: 'init_module', x86_64: 175, aarch64: 105, reason: 'loads kernel code' },
  { name: 'finit_module', x86_64: 313, aarch64: 273, reason: 'loads kernel code' },
  { name: 'delete_module', x86_64: 176, aarch64: 106, reason: 'unloads kernel code' },
  { name: 'reboot', x86_64: 169, aarch64: 142, reason: 'host administration' },
  { name: 'swapon', x86_64: 167, aarch64: 224, reason: 'host administration' },
  { name: 'swapoff', x86_64: 168, aarch64: 225, reason: 'host administration' },
  { name: 'acct', x86_64: 163, aarch64: 89, reason: 'host administration' },
  { name: 'quotactl', x86_64: 179, aarch64: 60, reason: 'host administration' },
  { name: 'quotactl_fd', x86_64: 443, aarch64: 443, reason: 'host administration' },
  { name: 'syslog', x86_64: 103, aarch64: 116, reason: 'reads the kernel log (addresses that defeat KASLR)' },
  { name: 'settimeofday', x86_64: 164, aarch64: 170, reason: 'the clock is not namespaced' },
  { name: 'clock_settime', x86_64: 227, aarch64: 112, reason: 'the clock is not namespaced' },
  { name: 'clock_adjtime', x86_64: 305, aarch64: 266, reason: 'the clock is not namespaced' },
  { name: 'sethostname', x86_64: 170, aarch64: 161, reason: 'the sandbox hostname is fixed' },
  { name: 'setdomainname', x86_64: 171, aarch64: 162, reason: 'the sandbox hostname is fixed' },
  { name: 'vhangup', x86_64: 153, aarch64: 58, reason: 'host administration' },
  { name: 'fanotify_init', x86_64: 300, aarch64: 262, reason: 'file-system wide monitoring' },
  { name: 'lookup_dcookie', x86_64: 212, aarch64: 18, reason: 'profiling interface, kernel addresses' },
  { name: 'nfsservctl', x86_64: 180, aarch64: 42, reason: 'removed kernel NFS server interface' },
  // Legacy x86 interfaces.
  { name: 'iopl', x86_64: 172, reason: 'raw port I/O' },
  { name: 'ioperm', x86_64: 173, reason: 'raw port I/O' },
  { name: 'modify_ldt', x86_64: 154, reason: 'segment tables: old exploit vector' },
  { name: 'uselib', x86_64: 134, reason: 'obsolete loader call' },
  { name: '_sysctl', x86_64: 156, reason: 'obsolete sysctl interface' },
];

/** `clone` numbers: allowed unless its flags ask for a namespace. */
const CLONE = { x86_64: 56, aarch64: 220 } as const;
/** `clone3` passes its flags in memory a filter cannot read; ENOSYS makes libc fall back to clone. */
const CLONE3 = { x86_64: 435, aarch64: 435 } as const;

/** The seccomp architecture of this process, or undefined when the filter does not support it. */
export function hostSeccompArchitecture(nodeArch: string = process.arch): SeccompArchitecture | undefined {
  if (nodeArch === 'x64') return 'x86_64';
  if (nodeArch === 'arm64') return 'aarch64';
  return undefined;
}

// Classic BPF opcodes (linux/filter.h).
const BPF = {
  loadWordAbsolute: 0x20, // BPF_LD | BPF_W | BPF_ABS
  jumpEqual: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
  jumpGreaterOrEqual: 0x35, // BPF_JMP | BPF_JGE | BPF_K
  jumpSet: 0x45, // BPF_JMP | BPF_JSET | BPF_K
  return: 0x06, // BPF_RET | BPF_K
} as const;

/** Offsets into `struct seccomp_data`; arguments are 64-bit, little-endian on both arches. */
const DATA = { nr: 0, arch: 4, firstArgumentLow: 16 } as const;

/** One instruction; a jump names its targets by label, resolved by `assemble`. */
type Instruction =
  | { code: number; k: number; label?: string }
  | { code: number; k: number; ifTrue: string | null; ifFalse: string | null; label?: string };

/**
 * Turns labelled instructions into `struct sock_filter` bytes (8 each: u16 code, u8 jt, u8 jf,
 * u32 k). A jump target `null` means the next instruction; targets must lie ahead, within 255.
 */
function assemble(program: readonly Instruction[]): Buffer {
  const labels = new Map<string, number>();
  program.forEach((instruction, index) => {
    if (instruction.label !== undefined) labels.set(instruction.label, index);
  });
  const bytes = Buffer.alloc(program.length * 8);
  program.forEach((instruction, index) => {
    const offset = (target: string | null): number => {
      if (target === null) return 0;
      const destination = labels.get(target);
      if (destination === undefined) throw new Error(`seccomp assembler: no label ${target}`);
      const distance = destination - index - 1;
      if (distance < 0 || distance > 255) throw new Error(`seccomp assembler: ${target} out of reach`);
      return distance;
    };
    bytes.writeUInt16LE(instruction.code, index * 8);
    if ('ifTrue' in instruction) {
      bytes.writeUInt8(offset(instruction.ifTrue), index * 8 + 2);
      bytes.writeUInt8(offset(instruction.ifFalse), index * 8 + 3);
    }
    bytes.writeUInt32LE(instruction.k >>> 0, index * 8 + 4);
  });
  return bytes;
}

const cache = new Map<SeccompArchitecture, Buffer>();

/**
 * The filter for `architecture` as raw `struct sock_filter` bytes (what bwrap's `--seccomp`
 * reads). Both supported architectures are little-endian, so the bytes are the same on the host.
 */
export function buildSeccompFilter(architecture: SeccompArchitecture): Buffer {
  const cached = cache.get(architecture);
  if (cached) return cached;
  const jump = (code: number, k: number, ifTrue: string | null, ifFalse: string | null): Instruction => ({
    code,
    k,
    ifTrue,
    ifFalse,
  });
  const program: Instruction[] = [
    { code: BPF.loadWordAbsolute, k: DATA.arch },
    jump(BPF.jumpEqual, AUDIT_ARCH[architecture], null, 'kill'),
    { code: BPF.loadWordAbsolute, k: DATA.nr },
  ];
  if (architecture === 'x86_64') program.push(jump(BPF.jumpGreaterOrEqual, X32_SYSCALL_BIT, 'kill', null));
  for (const syscall of BLOCKED_SYSCALLS) {
    const number = syscall[architecture];
    if (number !== undefined) program.push(jump(BPF.jumpEqual, number, 'deny', null));
  }
  program.push(
    jump(BPF.jumpEqual, CLONE3[architecture], 'no-such-call', null),
    jump(BPF.jumpEqual, CLONE[architecture], 'clone', null),
    { code: BPF.return, k: RET.allow },
    { label: 'clone', code: BPF.loadWordAbsolute, k: DATA.firstArgumentLow },
    jump(BPF.jumpSet, CLONE_NAMESPACE_FLAGS, 'deny', null),
    { code: BPF.return, k: RET.allow },
    { label: 'deny', code: BPF.return, k: RET.errno | EPERM },
    { label: 'no-such-call', code: BPF.return, k: RET.errno | ENOSYS },
    { label: 'kill', code: BPF.return, k: RET.killProcess },
  );
  const bytes = assemble(program);
  cache.set(architecture, bytes);
  return bytes;
}

/** The audit architecture number of a supported architecture (for tests and diagnostics). */
export function auditArchitecture(architecture: SeccompArchitecture): number {
  return AUDIT_ARCH[architecture];
}
