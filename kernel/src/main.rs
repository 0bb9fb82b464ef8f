//! stordom: the bare-metal kernel. Boots through the PVH or the multiboot2
//! entry in `boot`,
//! sets up the CPU, memory and clocks, then runs its job.
#![no_std]
#![no_main]

mod arch;
mod console;
mod disk_test;
mod grant_dma;
mod memory;
mod nbd;
mod net;
mod own_grant_table;
mod platform;
mod power;
mod restart;
mod rt;
mod serve;
mod serve_profile;
mod storage;
mod xen;
mod xen_selftest;

extern crate alloc;

use arch::{apic, clock, cpu, interrupts};
use boot::start_info::{BootProtocol, PhysRead, StartInfo, StringArena};
use kernel::cmdline::{Fault, Job, Options};

/// Reads loader data through the entry stub's identity map of low 4 GiB.
struct EarlyMemory;

impl PhysRead for EarlyMemory {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
        match paddr.checked_add(buf.len() as u64) {
            Some(end) if end <= 4 << 30 && paddr != 0 => {
                // SAFETY: the range lies in the early identity map and is
                // only read; a bad table address yields garbage, which the
                // parser bounds, not a fault.
                unsafe {
                    core::ptr::copy_nonoverlapping(paddr as *const u8, buf.as_mut_ptr(), buf.len())
                };
                true
            }
            _ => false,
        }
    }
}

fn fail(what: core::fmt::Arguments) -> ! {
    log::error!("{what}");
    crate::power::exit(cpu::ExitStatus::Failure)
}

#[unsafe(no_mangle)]
extern "C" fn stordom_main(start_info_paddr: u32, multiboot2_paddr: u32) -> ! {
    clock::mark_boot();
    console::init();
    arch::init_cpu();
    console::init_log(kernel::cmdline::LogLevel::Info);

    let mut arena = StringArena::new();
    let parsed = if multiboot2_paddr != 0 {
        StartInfo::parse_multiboot2(&EarlyMemory, u64::from(multiboot2_paddr), &mut arena)
    } else {
        StartInfo::parse(&EarlyMemory, u64::from(start_info_paddr), &mut arena)
    };
    let info = match parsed {
        Ok(info) => info,
        Err(e) => fail(format_args!(
            "boot information (start_info {start_info_paddr:#x}, multiboot2 {multiboot2_paddr:#x}): {e}"
        )),
    };
    let opts = Options::parse(info.cmdline);
    console::init_log(opts.log_level);
    serve::IDLE_POLL_NS.store(opts.idle_poll_ns, core::sync::atomic::Ordering::Relaxed);
    match info.protocol {
        BootProtocol::Pvh => log::info!(
            "stordom {} (PVH boot, start_info v{} at {:#x})",
            env!("CARGO_PKG_VERSION"),
            info.version,
            info.paddr
        ),
        BootProtocol::Multiboot2 => log::info!(
            "stordom {} (multiboot2 boot, information at {:#x}, ACPI RSDP at {:#x})",
            env!("CARGO_PKG_VERSION"),
            info.paddr,
            info.rsdp
        ),
    }
    log::info!("command line: \"{}\"", info.cmdline);
    if let Some(word) = opts.unknown {
        log::warn!("command line: ignoring \"{word}\"");
    }
    log::info!("memory map ({} entries):", info.memory_map().len());
    for r in info.memory_map() {
        log::info!("  {:#014x}-{:#014x} {:?}", r.start, r.end(), r.kind);
    }
    log::info!("modules ({}):", info.modules().len());
    for (i, m) in info.modules().iter().enumerate() {
        log::info!(
            "  module {i}: {:#x}+{:#x} \"{}\"",
            m.start,
            m.len,
            m.cmdline
        );
    }

    let mem = match memory::init(&info) {
        Ok(m) => m,
        Err(e) => fail(format_args!("memory setup failed: {e}")),
    };
    log::info!(
        "memory: {} MiB RAM, {} MiB free, heap {} MiB, kernel {:#x}-{:#x}, NX {}, W^X ok, RAM checked up to {:#x}",
        mem.ram_bytes >> 20,
        mem.free_bytes >> 20,
        mem.heap_bytes >> 20,
        mem.kernel.0,
        mem.kernel.1,
        if boot::entry::nx_enabled() {
            "on"
        } else {
            "unavailable"
        },
        mem.highest_checked
    );
    let heap_check: alloc::vec::Vec<u64> = (0..1024).collect();
    if heap_check.iter().sum::<u64>() != 1023 * 1024 / 2 {
        fail(format_args!("heap check failed"));
    }

    let xen = xen::detect().map(|cpuid| match xen::init(cpuid) {
        Ok(x) => x,
        Err(e) => fail(format_args!("xen: {e}")),
    });
    if let Some(x) = xen {
        let (major, minor) = xen_pv::hypercall::xen_version(&x.hypercalls).unwrap_or((0, 0));
        log::info!(
            "xen: {major}.{minor}, CPUID leaves at {:#x}, hypercall page installed",
            x.cpuid.base
        );
    }

    let tsc = match xen.and_then(|x| xen::tsc_hz(&x.cpuid)) {
        Some(hz) => Ok((clock::set_tsc_hz(hz), "reported by Xen")),
        None => clock::calibrate().map(|hz| (hz, "PIT calibrated")),
    };
    match tsc {
        Ok((hz, how)) => log::info!(
            "clock: TSC {}.{:03} MHz ({how})",
            hz / 1_000_000,
            (hz / 1000) % 1000
        ),
        Err(e) => fail(format_args!("clock: cannot calibrate the TSC: {e:?}")),
    }
    match apic::init(|phys| memory::map_mmio(phys, 4096)) {
        Ok(a) => log::info!(
            "apic: {} timer {} ticks/ms",
            if a.x2apic { "x2APIC" } else { "xAPIC" },
            a.ticks_per_ms
        ),
        Err(e) => fail(format_args!("apic: {e:?}")),
    }
    // Under Xen the LAPIC timer is not checked and interrupts stay off:
    // stordom does not use that timer there (it sleeps in SCHEDOP_poll),
    // and twice in fresh-clone `make test` runs stordom went silent for
    // good right here, waiting for the check's interrupt (first halting,
    // then spinning with interrupts on).
    if xen.is_none() {
        let before = (clock::now_ns(), apic::timer_interrupts());
        apic::sleep(10_000_000);
        let slept = clock::now_ns() - before.0;
        let interrupts = apic::timer_interrupts() - before.1;
        if interrupts == 0 {
            fail(format_args!("timer: no interrupt during a 10 ms sleep"));
        }
        log::info!(
            "timer: 10 ms sleep took {}.{:03} ms, {interrupts} interrupt(s)",
            slept / 1_000_000,
            (slept / 1000) % 1000
        );
    }

    let connection = xen.map(|x| match xen::start_services(x, mem.ram_end) {
        Ok(c) => {
            log::info!(
                "xen: shared_info, event channels ({:?}), xenstore and PV console up",
                c.upcall
            );
            c
        }
        Err(e) => fail(format_args!("xen: {e}")),
    });

    if let Some(fault) = opts.fault {
        trigger(fault);
    }
    log::info!("boot complete in {} us", clock::now_ns() / 1000);
    let job = opts
        .job
        .unwrap_or(if xen.is_some() { Job::Serve } else { Job::Boot });
    // A PVH guest has no PCI of its own: probing ports there only traps.
    // An HVM guest (started by firmware, so by multiboot2) has the device
    // model's bus, without ECAM on Xen's i440fx.
    let ports = xen.is_none() || info.protocol != BootProtocol::Pvh;
    let find_disks = || storage::find_disks(info.rsdp, ports);
    match job {
        Job::Boot => {}
        Job::DiskSelftest | Job::DiskBench => {
            let disks = find_disks().disks;
            let ok = if job == Job::DiskSelftest {
                disk_test::selftest_all(&disks)
            } else {
                disk_test::bench_all(&disks)
            };
            if !ok {
                fail(format_args!("{job:?} failed"));
            }
        }
        Job::XenSelftest | Job::Serve => {
            let Some(mut connection) = connection else {
                fail(format_args!("job={job:?} needs Xen"));
            };
            if job == Job::Serve {
                let mut setup = restart::ServeSetup {
                    modules: [(0, 0); boot::start_info::MAX_MODULES],
                    module_count: 0,
                    rsdp: info.rsdp,
                    pci_ports: ports,
                    vif_ip: opts.ip,
                };
                for (slot, m) in setup.modules.iter_mut().zip(info.modules()) {
                    *slot = (m.start, m.len);
                    setup.module_count += 1;
                }
                let mut found = find_disks();
                grant_dma::check_disks(&mut connection, &mut found.disks);
                net::reserve_at_boot(&mut connection);
                let setup = restart::serving_begins(setup);
                serve_job(connection, setup, found);
            }
            match xen_selftest::run(&mut connection) {
                Ok(summary) => log::info!("xen-selftest: PASS {summary}"),
                Err(why) => fail(format_args!("xen-selftest: FAIL {why}")),
            }
        }
    }
    log::info!("exiting");
    crate::power::exit(cpu::ExitStatus::Success)
}

/// Serves the disks `found` and the boot modules until the toolstack asks
/// stordom to shut down (at boot, and again after each in-place restart).
fn serve_job(
    connection: xen::XenConnection,
    setup: &restart::ServeSetup,
    found: storage::Discovery,
) -> ! {
    let opener = serve::KernelOpener::new(setup.modules(), found);
    match serve::run(connection, opener, setup.vif_ip) {
        Ok(()) => {
            log::info!("exiting");
            crate::power::exit(cpu::ExitStatus::Success)
        }
        Err(why) => fail(format_args!("serve: {why}")),
    }
}

/// Causes `fault` on purpose (the harness's negative tests).
fn trigger(fault: Fault) -> ! {
    log::warn!("triggering {fault:?} as the command line asks");
    match fault {
        // SAFETY: deliberately reads an unmapped, canonical address to take
        // a page fault; the handler never returns.
        Fault::PageFault => unsafe {
            (0x0000_7fff_dead_0000 as *const u64).read_volatile();
        },
        Fault::Panic => panic!("panic requested on the command line"),
        Fault::InvalidOpcode => cpu::raise_invalid_opcode(),
        Fault::StackOverflow => {
            recurse(core::hint::black_box(0));
        }
        Fault::InterruptStackOverflow => in_timer_interrupt(|| {
            recurse(core::hint::black_box(0));
        }),
        Fault::NestedInterrupt => in_timer_interrupt(|| {
            // Let the next timer interrupt in while this one runs.
            apic::end_of_interrupt();
            apic::halt_until_interrupt(1_000_000);
        }),
    }
    fail(format_args!("{fault:?} did not fault"))
}

/// Runs `body` inside the APIC timer's interrupt handler.
fn in_timer_interrupt(body: fn()) {
    static BODY: spin::Once<fn()> = spin::Once::new();
    BODY.call_once(|| body);
    interrupts::set_handler(apic::TIMER_VECTOR, || {
        if let Some(body) = BODY.get() {
            body();
        }
    });
    apic::sleep(10_000_000);
}

/// Recurses with a stack frame the optimiser cannot drop, until the boot
/// stack's (or an IST stack's) guard page is hit.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    recurse(depth + 1) + frame[depth as usize % 64]
}
