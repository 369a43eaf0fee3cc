"""Real boards: compiling the firmware, flashing and provisioning with mpremote, ROM images, the mip index, a virtual board."""
