fn main() {
    let r = arbor_kernels::roofline::Roofline::measure(512 << 20);
    println!(
        "{r:?} {:.1} GB/s {:.1} GMAC/s",
        r.read_bytes_per_sec / 1e9,
        r.int8_macs_per_sec / 1e9
    );
}
