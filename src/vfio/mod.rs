//! PCI sysfs, IOMMU groups, bind/unbind/restore vfio-pci, viability checks (issue: VFIO).
