# Two stordom builds on one passed-through NVMe, taking turns: each round
# starts one build as the HVM driver domain, runs the guest's job on it
# and shuts it down (the controller goes back to pciback for the other).
assign_controllers || return 1
ab_nvme_up() {
    # shellcheck disable=SC2086 # a list of PCI functions
    HVM_NAME=$1 HVM_EFI=/usr/local/bin/$1.efi start_hvm_stordom $STORDOM_PCI
}
ab_nvme_down() {
    xl shutdown "$1"
    wait_gone "$1" 60
}
ab_rounds 300 ab_nvme_up ab_nvme_down
