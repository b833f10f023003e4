fn main() -> std::process::ExitCode {
    stonelion::cli::main()
}
