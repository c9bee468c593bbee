from .dataset import DogCat
