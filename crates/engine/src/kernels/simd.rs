//! Which SIMD instruction set our kernels run, chosen once per process at run time.
//!
//! The binary is built for its architecture's baseline (x86-64 without AVX, plain aarch64), so
//! it runs on every CPU of that architecture; each kernel carries `#[target_feature]` variants
//! and picks one by the level detected here. `SAFETY_LAYERS_SIMD=scalar|avx2|avx512|neon|auto`
//! forces a lower level (and `avx512bf16`, which `auto` never picks, asks for bf16 dot products), to compare paths on one machine or to rule a path out while chasing a
//! difference.
//!
//! A forced level the CPU cannot run is clamped, not refused: the kernels run the best level
//! the CPU has that is not above the request, and one line on stderr says so when the kernels
//! first ask. Refusing would turn an environment setting into a failure deep inside a run (the
//! kernels have no error path); the clamp shows in `describe()`, which provenance records.
//!
//! The `gemm` crate (candle's matmuls and `kernels::gemm`) detects the CPU by itself, AVX-512
//! included (its `x86-v4` feature), and does not read the switch.

use std::sync::OnceLock;

/// The environment switch.
pub const VAR: &str = "SAFETY_LAYERS_SIMD";

/// A kernel path. `Scalar` is portable code (the compiler may still vectorise it for the
/// baseline target); the others are explicit intrinsics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar,
    /// AVX2, FMA and F16C (every AVX2 CPU has all three).
    Avx2,
    /// AVX-512 F, BW and VL, on top of `Avx2`'s set.
    Avx512,
    /// `Avx512` plus AVX-512 BF16: products on bf16 weights round the activations to bf16 and
    /// take `vdpbf16ps` (decode steps: `bf16_rows`; prefills: `amx` tiles where the CPU has
    /// them, else `dpbf16`). Never chosen by `auto`, because it changes
    /// results (every other kernel runs its `Avx512` path here); forced, it is the way to ask
    /// for that speed.
    Avx512Bf16,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Scalar,
        Level::Avx2,
        Level::Avx512,
        Level::Avx512Bf16,
        Level::Neon,
    ];

    /// How far above scalar: a clamp goes to the best runnable level not above the request.
    fn rank(self) -> u8 {
        match self {
            Level::Scalar => 0,
            Level::Avx2 | Level::Neon => 1,
            Level::Avx512 => 2,
            Level::Avx512Bf16 => 3,
        }
    }

    /// The switch's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
            Level::Neon => "neon",
        }
    }

    /// The instruction sets the path uses.
    pub fn features(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2+fma",
            Level::Avx512 => "avx512f+bw+vl",
            Level::Avx512Bf16 => "avx512f+bw+vl+bf16",
            Level::Neon => "neon",
        }
    }
}

/// What the CPU can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub best: Level,
    /// AVX-512 BF16 (`vdpbf16ps`): `Level::Avx512Bf16` runs (when forced).
    pub bf16: bool,
    /// AVX-512 VNNI: reported for provenance; no kernel uses it yet.
    pub vnni: bool,
}

impl Cpu {
    pub fn detect() -> Cpu {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            Cpu {
                best: if avx512 {
                    Level::Avx512
                } else if avx2 {
                    Level::Avx2
                } else {
                    Level::Scalar
                },
                bf16: avx512 && has!("avx512bf16"),
                vnni: avx512 && has!("avx512vnni"),
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            let neon = std::arch::is_aarch64_feature_detected!("neon");
            Cpu {
                best: if neon { Level::Neon } else { Level::Scalar },
                bf16: false,
                vnni: false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Cpu {
                best: Level::Scalar,
                bf16: false,
                vnni: false,
            }
        }
    }

    /// Whether this CPU can execute `l`'s instructions.
    pub fn runs(self, l: Level) -> bool {
        match l {
            Level::Scalar => true,
            Level::Avx2 => matches!(self.best, Level::Avx2 | Level::Avx512),
            Level::Avx512Bf16 => self.best == Level::Avx512 && self.bf16,
            Level::Avx512 | Level::Neon => self.best == l,
        }
    }

    /// E.g. "avx512f+bw+vl+bf16+vnni".
    pub fn describe(self) -> String {
        let mut s = self.best.features().to_string();
        if self.bf16 {
            s.push_str("+bf16");
        }
        if self.vnni {
            s.push_str("+vnni");
        }
        s
    }
}

/// The switch's value, parsed; an unset or empty variable is `Auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Auto,
    Force(Level),
}

pub fn parse(v: &str) -> Result<Request, String> {
    let v = v.trim().to_ascii_lowercase();
    if v.is_empty() || v == "auto" {
        return Ok(Request::Auto);
    }
    Level::ALL
        .into_iter()
        .find(|l| l.name() == v)
        .map(Request::Force)
        .ok_or_else(|| {
            format!("{VAR}={v} is not one of scalar, avx2, avx512, avx512bf16, neon, auto")
        })
}

/// The decision for one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub cpu: Cpu,
    pub active: Level,
    /// The level asked for, when forced.
    pub forced: Option<Level>,
    /// Why the active level differs from what was asked (a clamp or an unknown value).
    pub warning: Option<String>,
}

/// The level to run given the switch's raw value and the CPU (pure: tests inject both).
pub fn resolve(raw: Option<&str>, cpu: Cpu) -> Choice {
    let auto = |warning| Choice {
        cpu,
        active: cpu.best,
        forced: None,
        warning,
    };
    match parse(raw.unwrap_or("")) {
        Ok(Request::Auto) => auto(None),
        Err(e) => auto(Some(format!("{e}; using auto ({})", cpu.describe()))),
        Ok(Request::Force(l)) if cpu.runs(l) => Choice {
            cpu,
            active: l,
            forced: Some(l),
            warning: None,
        },
        Ok(Request::Force(l)) => {
            let active = Level::ALL
                .into_iter()
                .filter(|&c| cpu.runs(c) && c.rank() <= l.rank())
                .max_by_key(|c| c.rank())
                .unwrap_or(Level::Scalar);
            Choice {
                cpu,
                active,
                forced: Some(l),
                warning: Some(format!(
                    "{VAR}={} asks for {} but this CPU has {}; the kernels run {}",
                    l.name(),
                    l.features(),
                    cpu.describe(),
                    active.features()
                )),
            }
        }
    }
}

impl Choice {
    /// "avx2+fma", "avx2+fma (forced: scalar)", "avx2+fma (forced: avx512, clamped to avx2)".
    pub fn describe(&self) -> String {
        let cpu = self.cpu.describe();
        match self.forced {
            None => cpu,
            Some(f) if f == self.active => format!("{cpu} (forced: {})", f.name()),
            Some(f) => format!(
                "{cpu} (forced: {}, clamped to {})",
                f.name(),
                self.active.name()
            ),
        }
    }
}

/// The process's choice, made on first use (the warning, if any, printed then, once).
pub fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let raw = std::env::var(VAR).ok();
        let c = resolve(raw.as_deref(), Cpu::detect());
        if let Some(w) = &c.warning {
            eprintln!("warning: {w}");
        }
        c
    })
}

/// The level the kernels run.
#[inline]
pub fn level() -> Level {
    choice().active
}

/// For provenance: the CPU's level and any forcing, e.g. "avx2+fma (forced: scalar)".
pub fn describe() -> String {
    choice().describe()
}

/// The levels a kernel test can run here, each compared against `Scalar` by the caller. A path
/// this CPU cannot execute is named on stderr as skipped (never passed silently), and fails the
/// test when `SAFETY_LAYERS_REQUIRE_SIMD` names it (set that on a machine that has it).
#[cfg(test)]
pub(crate) fn test_levels(what: &str) -> Vec<Level> {
    let cpu = Cpu::detect();
    let required = std::env::var("SAFETY_LAYERS_REQUIRE_SIMD").unwrap_or_default();
    let arch_levels: &[Level] = if cfg!(target_arch = "x86_64") {
        &[Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Bf16]
    } else if cfg!(target_arch = "aarch64") {
        &[Level::Scalar, Level::Neon]
    } else {
        &[Level::Scalar]
    };
    let mut run = vec![];
    for &l in arch_levels {
        if cpu.runs(l) {
            run.push(l);
            continue;
        }
        let msg = format!(
            "{what}: SKIPPED the {} path: this CPU has {}",
            l.features(),
            cpu.describe()
        );
        assert!(
            !required.split(',').any(|r| r.trim() == l.name()),
            "{msg}, and SAFETY_LAYERS_REQUIRE_SIMD={required} requires it"
        );
        eprintln!("{msg}");
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX2: Cpu = Cpu {
        best: Level::Avx2,
        bf16: false,
        vnni: false,
    };
    const AVX512: Cpu = Cpu {
        best: Level::Avx512,
        bf16: true,
        vnni: true,
    };
    const ARM: Cpu = Cpu {
        best: Level::Neon,
        bf16: false,
        vnni: false,
    };

    #[test]
    fn parses_every_spelling_and_rejects_the_rest() {
        assert_eq!(parse(""), Ok(Request::Auto));
        assert_eq!(parse(" Auto "), Ok(Request::Auto));
        assert_eq!(parse("SCALAR"), Ok(Request::Force(Level::Scalar)));
        assert_eq!(parse("avx2"), Ok(Request::Force(Level::Avx2)));
        assert_eq!(parse("avx512"), Ok(Request::Force(Level::Avx512)));
        assert_eq!(parse("neon"), Ok(Request::Force(Level::Neon)));
        let e = parse("avx3").unwrap_err();
        assert!(e.contains(VAR) && e.contains("avx3"), "{e}");
    }

    #[test]
    fn forcing_a_runnable_level_uses_it() {
        for (raw, cpu, want) in [
            (None, AVX2, Level::Avx2),
            (Some("auto"), AVX512, Level::Avx512),
            (Some("scalar"), AVX512, Level::Scalar),
            (Some("avx2"), AVX512, Level::Avx2),
            (Some("avx512bf16"), AVX512, Level::Avx512Bf16),
            (Some("scalar"), ARM, Level::Scalar),
        ] {
            let c = resolve(raw, cpu);
            assert_eq!(
                (c.active, c.warning.as_deref()),
                (want, None),
                "{raw:?} {cpu:?}"
            );
        }
        assert_eq!(
            resolve(Some("scalar"), AVX2).describe(),
            "avx2+fma (forced: scalar)"
        );
        assert_eq!(resolve(None, AVX512).describe(), "avx512f+bw+vl+bf16+vnni");
    }

    #[test]
    fn a_level_above_the_cpu_is_clamped_with_a_warning() {
        for (raw, cpu, want) in [
            ("avx512", AVX2, Level::Avx2),
            // vdpbf16ps asked for on an AVX-512 CPU without AVX-512 BF16: plain AVX-512.
            (
                "avx512bf16",
                Cpu {
                    bf16: false,
                    ..AVX512
                },
                Level::Avx512,
            ),
            ("avx512bf16", AVX2, Level::Avx2),
            ("neon", AVX512, Level::Avx2),
            ("avx2", ARM, Level::Neon),
            ("avx512", ARM, Level::Neon),
            (
                "avx2",
                Cpu {
                    best: Level::Scalar,
                    ..AVX2
                },
                Level::Scalar,
            ),
        ] {
            let c = resolve(Some(raw), cpu);
            assert_eq!(c.active, want, "{raw} on {cpu:?}");
            let w = c.warning.expect("a clamp warns");
            assert!(w.contains(VAR) && w.contains(&cpu.describe()), "{w}");
        }
        assert_eq!(
            resolve(Some("avx512"), AVX2).describe(),
            "avx2+fma (forced: avx512, clamped to avx2)"
        );
        let c = resolve(Some("fast"), AVX2);
        assert_eq!((c.active, c.forced), (Level::Avx2, None));
        assert!(c.warning.unwrap().contains("using auto"));
    }

    #[test]
    fn the_detected_level_is_runnable() {
        let cpu = Cpu::detect();
        assert!(cpu.runs(cpu.best) && cpu.runs(Level::Scalar));
        eprintln!("this CPU: {}; kernels: {}", cpu.describe(), describe());
    }
}
