/// The server's allocator, mimalloc. Each point written over HTTP or MQTT allocates its
/// series key, and mimalloc serves these small allocations with fewer instructions than
/// glibc's malloc (callgrind profiles in `docs/benchmarks.md`). It is set in the binary,
/// not the library, so that tests and fuzz targets, whose sanitizers hook the system
/// malloc, keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    stonelion::cli::main()
}
