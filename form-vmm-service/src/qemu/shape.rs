//! The shape of a VM: its vCPUs and memory, and the room it was started with for
//! hot-plug. A shape is written as QEMU arguments (for a start, and in a snapshot's
//! manifest so that a clone is started with the same devices) and read back from them.
//!
//! ```text
//! -smp 1,sockets=MAXC,cores=1,threads=1,maxcpus=MAXC     vCPU 0, the only one that stays
//! -device max-x86_64-cpu,id=cpuK,socket-id=K,...          vCPU K (1..N), unpluggable
//! -m BOOTM,slots=S,maxmem=MAXM                            boot memory, room for DIMMs
//! -object memory-backend-ram,id=memK,size=XM -device pc-dimm,id=dimmK,memdev=memK
//! ```
//!
//! Every vCPU but the first is a device, even at start, so that each can be unplugged
//! later; a DIMM added by a resize stays (memory goes back through the balloon).

/// Memory is added in blocks of the guest kernel's memory section (x86-64: 128 MiB), so
/// that all of it can be onlined.
pub(super) const DIMM_BLOCK_MIB: u64 = 128;
/// DIMM slots a VM is started with.
pub(super) const SLOTS: u32 = 8;
/// QEMU's CPU model and its hot-pluggable device type.
const CPU_DRIVER: &str = "max-x86_64-cpu";

/// vCPUs and memory of a VM, with its hot-plug room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    /// vCPUs plugged.
    pub vcpus: u32,
    /// vCPUs it can have (`maxcpus`).
    pub max_vcpus: u32,
    /// Memory it booted with, MiB.
    pub boot_mib: u64,
    /// Hot-plugged DIMMs, MiB each, in order.
    pub dimms: Vec<u64>,
    /// Memory it can have (`maxmem`), MiB.
    pub max_mib: u64,
}

impl Shape {
    /// A new VM of `vcpus` and `memory_mib`, with room up to the maxima (raised to the
    /// asked size where that is larger).
    pub(super) fn new(vcpus: u32, memory_mib: u64, max_vcpus: u32, max_mib: u64) -> Self {
        let vcpus = vcpus.max(1);
        Self {
            vcpus,
            max_vcpus: max_vcpus.max(vcpus),
            boot_mib: memory_mib,
            dimms: Vec::new(),
            max_mib: max_mib.max(memory_mib),
        }
    }

    /// Memory plugged (boot and DIMMs), MiB: the most the balloon can give the guest.
    pub(super) fn plugged_mib(&self) -> u64 {
        self.boot_mib + self.dimms.iter().sum::<u64>()
    }

    /// The QEMU arguments of this shape.
    pub(super) fn args(&self) -> Vec<String> {
        let mut a = vec![
            "-smp".to_owned(),
            format!(
                "1,sockets={m},cores=1,threads=1,maxcpus={m}",
                m = self.max_vcpus
            ),
            "-m".to_owned(),
            format!(
                "{}M,slots={SLOTS},maxmem={}M",
                self.boot_mib,
                self.max_mib.max(self.boot_mib)
            ),
        ];
        for k in 1..self.vcpus {
            a.extend(["-device".to_owned(), cpu_device(k)]);
        }
        for (k, size) in self.dimms.iter().enumerate() {
            a.extend([
                "-object".to_owned(),
                format!("memory-backend-ram,id=mem{k},size={size}M"),
                "-device".to_owned(),
                format!("pc-dimm,id=dimm{k},memdev=mem{k}"),
            ]);
        }
        a
    }

    /// Splits machine arguments into the shape and the rest; `None` when they hold no
    /// `-smp` or `-m` this module wrote.
    pub(super) fn split(args: &[String]) -> Option<(Vec<String>, Shape)> {
        let mut rest = Vec::new();
        let (mut max_vcpus, mut boot, mut max_mib) = (None, None, None);
        let (mut vcpus, mut dimms) = (1u32, Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-smp" => max_vcpus = option(it.next()?, "maxcpus")?.parse().ok(),
                "-m" => {
                    let v = it.next()?;
                    boot = mib(v.split(',').next()?);
                    max_mib = mib(option(v, "maxmem")?);
                }
                "-device" => {
                    let v = it.next()?;
                    if v.starts_with(CPU_DRIVER) {
                        vcpus += 1;
                    } else if !v.starts_with("pc-dimm,") {
                        rest.extend([a.clone(), v.clone()]);
                    }
                }
                "-object" => {
                    let v = it.next()?;
                    match v.strip_prefix("memory-backend-ram,") {
                        Some(o) => dimms.push(mib(option(o, "size")?)?),
                        None => rest.extend([a.clone(), v.clone()]),
                    }
                }
                _ => rest.push(a.clone()),
            }
        }
        Some((
            rest,
            Shape {
                vcpus,
                max_vcpus: max_vcpus?,
                boot_mib: boot?,
                dimms,
                max_mib: max_mib?,
            },
        ))
    }
}

/// The device of vCPU `k`.
pub(super) fn cpu_device(k: u32) -> String {
    format!("{CPU_DRIVER},id=cpu{k},socket-id={k},core-id=0,thread-id=0")
}

/// The value of `key=` in a comma-separated option list.
fn option<'a>(list: &'a str, key: &str) -> Option<&'a str> {
    list.split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `128M`, `2G` or `128` (MiB) as MiB.
fn mib(v: &str) -> Option<u64> {
    match v.char_indices().last()? {
        (i, 'M' | 'm') => v[..i].parse().ok(),
        (i, 'G' | 'g') => v[..i].parse::<u64>().ok().map(|g| g * 1024),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_survives_its_arguments() {
        let mut s = Shape::new(3, 256, 8, 4096);
        s.dimms = vec![128, 256];
        let mut args = vec!["-M".to_owned(), "pc".to_owned()];
        args.extend(s.args());
        args.extend(["-device".to_owned(), "virtio-net-pci,netdev=n0".to_owned()]);
        let (rest, back) = Shape::split(&args).expect("split");
        assert_eq!(back, s);
        assert_eq!(back.plugged_mib(), 640);
        assert_eq!(rest, ["-M", "pc", "-device", "virtio-net-pci,netdev=n0"]);
    }

    #[test]
    fn maxima_grow_to_the_asked_size() {
        let s = Shape::new(0, 512, 2, 256);
        assert_eq!((s.vcpus, s.max_vcpus, s.max_mib), (1, 2, 512));
        let s = Shape::new(4, 128, 2, 256);
        assert_eq!(s.max_vcpus, 4);
    }

    #[test]
    fn arguments_without_a_shape_are_refused() {
        let old = ["-m", "128", "-smp", "1"].map(String::from);
        assert_eq!(Shape::split(&old), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(mib("128M"), Some(128));
        assert_eq!(mib("2G"), Some(2048));
        assert_eq!(mib("96"), Some(96));
        assert_eq!(mib("x"), None);
    }
}
