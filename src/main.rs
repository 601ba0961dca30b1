fn main() -> std::process::ExitCode {
    warpbase::cli::main()
}
