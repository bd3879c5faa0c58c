// Public umbrella header of the difformer library: the model, data loading and training.
#pragma once
#include "core/context.hpp"
#include "core/error.hpp"
#include "data/dataset.hpp"
#include "data/npz.hpp"
#include "model/difformer.hpp"
#include "train/adam.hpp"
#include "train/trainer.hpp"
