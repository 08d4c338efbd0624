//! Criterion benches of the bench suite: one group per case, forward
//! (allocating and into a buffer) and backward, with the bytes each must move.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use normlab_cli::bench::{suite, Prepared};
use std::time::Duration;

fn kernels(c: &mut Criterion) {
    for case in suite() {
        let mut p = Prepared::<f32>::new(&case).expect("bench case prepares");
        let mut group = c.benchmark_group(&case.name);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Bytes(p.forward_bytes() as u64));
        group.bench_function("fwd", |b| b.iter(|| p.forward().expect("forward")));
        group.bench_function("fwd_into", |b| {
            b.iter(|| p.forward_into().expect("forward"))
        });
        group.throughput(Throughput::Bytes(p.backward_bytes() as u64));
        group.bench_function("bwd", |b| b.iter(|| p.backward().expect("backward")));
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
