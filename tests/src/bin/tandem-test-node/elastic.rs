//! The `elastic` mode: a training loop under tandem-elastic.

use std::time::Duration;

use tandem::{ReduceOp, Result};

use super::flag_value;

/// An elastic job (tandem-elastic): `--steps N` steps of w += allreduce(g), g a small-integer
/// function of (id, step) so every sum is exact. Prints `EPOCH e RANK r WORLD n` at each
/// (re-)formation, `APPLIED step MEMBERS id,id,..` when a step's allreduce succeeded here, and
/// `RESULT {"w": [...], "steps": n}` at the end.
pub(crate) fn run_elastic(args: &[String]) -> Result<()> {
    use tandem_elastic::{Elastic, ElasticConfig, State};
    let steps: u64 = flag_value(args, "--steps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let len: usize = flag_value(args, "--len")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let pause = Duration::from_millis(
        flag_value(args, "--pause-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    // `--die-at S --die-id I`: process I exits with status 86 right after applying step S (a crash
    // between a step and its commit).
    let die_at: Option<u64> = flag_value(args, "--die-at").and_then(|v| v.parse().ok());
    let die_id: Option<usize> = flag_value(args, "--die-id").and_then(|v| v.parse().ok());
    // `--die-in-reset I`: process I exits with status 87 in its first reset, once admitted to a
    // group and given the state but before its first step (a joiner dying during its join).
    let die_in_reset: Option<usize> =
        flag_value(args, "--die-in-reset").and_then(|v| v.parse().ok());
    let mut elastic = Elastic::from_env(ElasticConfig::from_env()?)?;
    let id = elastic.id() as usize;
    let mut state = State::new()
        .with_array("w", vec![0.0; len])
        .with_scalar("step", 0.0);
    elastic.run(
        &mut state,
        |ctx| {
            println!(
                "EPOCH {} RANK {} WORLD {}",
                ctx.epoch(),
                ctx.rank(),
                ctx.world_size()
            );
            if die_in_reset == Some(id) {
                std::process::exit(87);
            }
        },
        |ctx, s| loop {
            let step = s.scalar("step").unwrap_or(0.0) as u64;
            if step >= steps {
                return Ok(());
            }
            let mut g: Vec<f32> = (0..len)
                .map(|i| ((i * 7 + id * 13 + step as usize * 3) % 11) as f32 - 5.0)
                .collect();
            ctx.group().allreduce(&mut g, ReduceOp::Sum)?;
            if let Some(w) = s.array_mut("w") {
                for (w, g) in w.iter_mut().zip(&g) {
                    *w += g;
                }
            }
            s.set_scalar("step", (step + 1) as f64);
            let members: Vec<String> = ctx.members().iter().map(u64::to_string).collect();
            println!("APPLIED {} MEMBERS {}", step + 1, members.join(","));
            if die_at == Some(step + 1) && die_id == Some(id) {
                std::process::exit(86);
            }
            ctx.commit(s)?;
            std::thread::sleep(pause);
        },
    )?;
    let w: Vec<f64> = state
        .array("w")
        .unwrap_or_default()
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    println!(
        "RESULT {}",
        serde_json::json!({"w": w, "steps": state.scalar("step")})
    );
    Ok(())
}
