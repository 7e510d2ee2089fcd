"""hvbench's emulator of KVM's VMX/EPT/MMU TLB-flush machinery (stdlib + numpy only)."""
