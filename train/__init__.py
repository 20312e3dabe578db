"""Training stage: NIH cell folders to a ResNet50V2 Parasitized/Uninfected classifier."""
