/// mimalloc instead of glibc's malloc: every request allocates and frees dozens of small
/// objects across worker threads, and glibc's `malloc`/`free`/`malloc_consolidate` were
/// about 15% of the server's CPU on `/me` (BENCHMARKS.md, round 3).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    warpbase::cli::main()
}
