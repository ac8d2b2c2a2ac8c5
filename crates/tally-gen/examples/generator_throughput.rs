//! Measures the pure generator: records per second, no Kafka.
//!
//! `cargo run -p tally-gen --release --example generator_throughput -- [count] [seed]`

use std::time::Instant;

use tally_gen::generator::{Generator, GeneratorConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u64 = args
        .next()
        .map(|text| text.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let seed: u64 = args
        .next()
        .map(|text| text.parse())
        .transpose()?
        .unwrap_or(42);
    let config = GeneratorConfig {
        count,
        seed,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::new(config)?;
    let started = Instant::now();
    let mut bytes = 0_usize;
    for record in generator.by_ref() {
        bytes += record.value.len();
    }
    let generated = started.elapsed();
    let truth = generator.truth();
    let total = started.elapsed();
    println!(
        "{count} records, {bytes} value bytes in {:.3} s: {:.0} records/s ({:.1} MB/s); truth with {} window entries built in {:.3} s",
        generated.as_secs_f64(),
        count as f64 / generated.as_secs_f64(),
        bytes as f64 / generated.as_secs_f64() / 1e6,
        truth.windows.len(),
        (total - generated).as_secs_f64(),
    );
    println!(
        "counted {} (corrections {}), duplicates {} (conflicting {}), too late {}, rejected {}",
        truth.counted,
        truth.counted_corrections,
        truth.duplicates,
        truth.conflicting_duplicates,
        truth.too_late,
        truth.rejected
    );
    Ok(())
}
